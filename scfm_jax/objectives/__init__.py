"""What is trained: pipeline batch -> model inputs -> loss, one module per model.

The train loop looks the objective up by `config.model.name` in `OBJECTIVES`, an explicit table.
"""
from scfm_jax.errors import UsageError
from scfm_jax.objectives import scfoundation, scmulan
from scfm_jax.objectives.objective import Objective

OBJECTIVES: dict[str, Objective] = {
    scfoundation.OBJECTIVE.name: scfoundation.OBJECTIVE,
    scmulan.OBJECTIVE.name: scmulan.OBJECTIVE,
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UsageError(f"config.model.name={name!r} is not a known model; choose one of "
                         f"{sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
