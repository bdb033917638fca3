"""Mesh and sharding rules, train state, the train loop and Orbax checkpointing."""
