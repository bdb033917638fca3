"""Facts with one home: the batch schema lives in the pipeline and the plan compiles it; the
training, data and CLI layers name no model (they go through the objective's contract)."""
import ast
import warnings
from pathlib import Path

import anndata
import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_jax.data import pipeline as pipeline_lib
from scfm_jax.data.convert import convert
from scfm_jax.data.store import CellStore
from scfm_jax.data.vocabulary import Vocabulary
from scfm_jax.train import partitioning, plan
from test_plan import tiny_plan_config

PACKAGE = Path(__file__).resolve().parents[1] / "scfm_jax"
MODEL_WORDS = ("scfoundation", "scmulan")


def _model_mentions(path: Path) -> list[str]:
    """Where a module names a model in code: an imported module path, an identifier (a name,
    attribute or function), or a string compared with something (`config.model.name ==
    "scmulan"`). Comments, docstrings and help texts may name them."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        texts = []
        if isinstance(node, ast.Import):
            texts = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            texts = [node.module or ""] + [alias.name for alias in node.names]
        elif isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            texts = [node.name]
        elif isinstance(node, ast.Compare):
            texts = [c.value for c in [node.left, *node.comparators]
                     if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            texts += [e.value for c in node.comparators if isinstance(c, (ast.Tuple, ast.List,
                                                                           ast.Set))
                      for e in c.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {text}" for text in texts
                  if any(word in text.lower() for word in MODEL_WORDS)]
    return found


def test_train_data_and_cli_entry_name_no_model():
    files = [*sorted((PACKAGE / "train").glob("*.py")), *sorted((PACKAGE / "data").glob("*.py")),
             PACKAGE / "main.py"]
    mentions = [m for path in files for m in _model_mentions(path)]
    assert mentions == []


def test_the_model_check_catches_a_branch_on_a_model_name(tmp_path):
    branchy = PACKAGE / "train" / "_probe_for_test.py"
    try:
        branchy.write_text('def f(config):\n    if config.model.name != "scfoundation":\n'
                           '        raise ValueError("only one model")\n')
        assert len(_model_mentions(branchy)) == 1
    finally:
        branchy.unlink()


class LabelledPipeline(pipeline_lib.Pipeline):
    """A pipeline with one more field: the cell's library size as a [B] float32."""
    FIELDS = {**pipeline_lib.Pipeline.FIELDS, "library_size": pipeline_lib.BatchField("float32")}

    def batch(self, step):
        batch = super().batch(step)
        batch["library_size"] = batch["total_counts"] / 1e4
        return batch


def _store(tmp_path):
    rng = np.random.default_rng(0)
    dense = (rng.random((40, 30)) < 0.3) * rng.integers(1, 9, (40, 30))
    obs = pd.DataFrame({"label": pd.Categorical(rng.choice(["a", "b"], 40))},
                       index=[f"c{i}" for i in range(40)])
    adata = anndata.AnnData(sp.csr_matrix(dense.astype(np.float32)), obs=obs,
                            var=pd.DataFrame(index=[f"G{i}" for i in range(30)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert([adata], str(tmp_path / "store"), vocabulary=Vocabulary("v", adata.var_names),
                shard_size=16, chunk_elements=256)
    return CellStore.open(str(tmp_path / "store"))


def test_plan_compiles_the_batch_the_pipeline_feeds(tmp_path):
    """The plan's abstract batch is the pipeline's schema: the same fields, dtypes and shapes as a
    real batch (host-only fields left out), and a pipeline with an extra field extends it."""
    store = _store(tmp_path)
    config = tiny_plan_config()
    config.data.obs_keys = ("label",)
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    for pipeline_class in (pipeline_lib.Pipeline, LabelledPipeline):
        pipeline = pipeline_class(store, global_batch_size=8, seed=0, buckets=(16, 32),
                                  max_nonzero=32, obs_keys=("label",), process_index=0,
                                  process_count=1)
        real = pipeline_lib.device_fields(pipeline.batch(0), pipeline_class)
        bucket = real["gene_ids"].shape[1]
        abstract = plan.abstract_batch(config, mesh, bucket, 8, pipeline_class)
        assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
            k: (v.shape, v.dtype) for k, v in real.items()}
        assert "cell_index" not in abstract
    assert "library_size" in abstract
