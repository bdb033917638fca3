"""A third model added by the recipe of docs/adding_a_model.md, file for file: `model.py` is what
would be `scfm_jax/models/toy.py`, `objective.py` `scfm_jax/objectives/toy.py` (its `OBJECTIVE` a
row of `scfm_jax.objectives.OBJECTIVES`, which tests/test_model_recipe.py adds) and `toy_tiny.py`
`configs/toy_tiny.py`. Nothing else of the package knows it."""
