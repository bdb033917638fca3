"""scMulan pretraining: token set from a store, device-built sentences, the loss, the train loop."""
import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from flax import nnx

from scfm_jax.configs import scmulan_tiny
from scfm_jax.data import cell_sentence
from scfm_jax.data.convert import convert
from scfm_jax.data.pipeline import Pipeline
from scfm_jax.data.store import CellStore
from scfm_jax.models import scmulan
from scfm_jax.objectives import scmulan as scmulan_objective

TYPES = ["T cell", "B cell", "Monocyte"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    n_cells, n_genes = 96, 60
    types = rng.integers(0, 3, n_cells)
    means = rng.gamma(0.5, 2.0, (3, n_genes))  # a gene programme per type: something to learn
    counts = rng.poisson(means[types] * rng.lognormal(0, 0.3, (n_cells, 1))).astype(np.float32)
    counts[:, 0] += 1
    cell_type = pd.Categorical([TYPES[t] for t in types], categories=TYPES)
    cell_type[:4] = np.nan  # unlabelled cells: no annotation task for them
    obs = pd.DataFrame({"cell_type": cell_type,
                        "tissue": pd.Categorical(rng.choice(["Lung", "Blood"], n_cells))},
                       index=[f"c{i}" for i in range(n_cells)])
    adata = anndata.AnnData(scipy.sparse.csr_matrix(counts), obs=obs,
                            var=pd.DataFrame(index=[f"G{i:03d}" for i in range(n_genes)]))
    path = tmp_path_factory.mktemp("scmulan_store") / "store"
    convert([adata], str(path), vocabulary="from-data", shard_size=64)
    return str(path)


def _config(store, steps=30):
    config = scmulan_tiny.get_config()
    config.data.store = store
    config.data.update(global_batch_size=16, buckets=(64,), max_nonzero=64, block_size=8,
                       window_blocks=4, eval_batches=1)
    config.model.update(n_layer=1, n_head=2, n_embd=32)
    config.objective.update(num_genes=40, metadata_columns=("tissue", "cell_type"),
                            cell_type_columns=("cell_type",), organ_columns=("tissue",))
    config.train.update(steps=steps, warmup_steps=2, log_every=1, eval_every=steps,
                        checkpoint_every=steps, learning_rate=1e-2)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return config


@pytest.fixture(scope="module")
def resolved(store):
    return scmulan_objective.resolve_config(_config(store), CellStore.open(store))


def test_resolve_builds_the_token_set_from_the_store(store, resolved):
    tables = scmulan_objective.sentence_tables(resolved.objective)
    token_set = tables.token_set
    assert len(token_set.genes) == 40 and resolved.model.vocab_size == len(token_set)
    assert token_set.tokens[0] == "<E>" and "<PCT>" in token_set and "Blood" in token_set
    symbols = list(CellStore.open(store).vocabulary.symbols)
    assert all(symbols[p] == g for g, p in zip(token_set.genes, tables.gene_positions))
    assert set(resolved.data.obs_keys) == {"tissue", "cell_type"}
    assert token_set.cell_type_terms == frozenset(TYPES)
    assert scmulan_objective.token_set_from_config(resolved).tokens == token_set.tokens


def _host_sentence(batch, row, tables, task):
    """The sentence of one cell built on the host from the documented rules."""
    ts = tables.token_set
    expression = np.zeros(len(ts.genes), np.float32)
    for gene, count in zip(batch["gene_ids"][row], batch["counts"][row]):
        if gene >= 0 and gene in tables.gene_positions:
            expression[tables.gene_positions.index(gene)] = np.log1p(
                np.float32(count) / np.float32(batch["total_counts"][row]) * np.float32(1e4))
    genes, levels = cell_sentence.gene_tokens(expression, ts)

    def terms(columns):
        out = [tables.obs_tokens[c][batch[f"obs/{c}"][row]] for c in columns
               if batch[f"obs/{c}"][row] >= 0]
        return [t for t in out if t >= 0]

    if task == 2:
        meta = terms(tables.metadata_columns)
        return ([*meta, ts.id("<SPToken1>"), *genes, 0], [0] * (len(meta) + 1) + [*levels, 0])
    targets = terms(tables.cell_type_columns if task == 0 else tables.organ_columns)
    token = ts.id("<PCT>" if task == 0 else "<SPToken3>")
    return [*genes, token, *targets, 0], [*levels, 0] + [0] * (len(targets) + 1)


def test_device_sentences_follow_the_rules(store, resolved):
    tables = scmulan_objective.sentence_tables(resolved.objective)
    pipeline = Pipeline(CellStore.open(store), global_batch_size=32, seed=0, buckets=(64,),
                        max_nonzero=64, obs_keys=resolved.data.obs_keys)
    batch = pipeline.batch(0)
    sentences = jax.jit(lambda b, k: cell_sentence.build_sentences(b, tables, k))(
        {k: v for k, v in batch.items() if k != "cell_index"}, jax.random.key(1))
    tasks = np.asarray(sentences["task"])
    assert set(tasks) == {0, 1, 2}
    for row in range(32):
        ids, levels = _host_sentence(batch, row, tables, tasks[row])
        np.testing.assert_array_equal(np.asarray(sentences["ids"][row, :len(ids)]), ids)
        np.testing.assert_array_equal(np.asarray(sentences["levels"][row, :len(ids)]), levels)
        assert not np.asarray(sentences["ids"][row, len(ids):]).any()
        prefix = int(sentences["prefix_length"][row])
        assert ids[prefix - 1] in tables.token_set.encode(["<PCT>", "<SPToken3>", "<SPToken1>"])
        assert prefix + int(sentences["target_length"][row]) == len(ids) - 1
        if batch["obs/cell_type"][row] < 0:
            assert tasks[row] != 0


def test_loss_matches_its_definition():
    model = scmulan.ScMulan(dict(vocab_size=12, n_layer=1, n_head=2, n_embd=8), rngs=nnx.Rngs(0))
    # two sentences: prefix [3, 4, task 10], targets [5, 6] (+<E>); prefix [7, task 11], target [2]
    ids = jnp.array([[3, 4, 10, 5, 6, 0, 0], [7, 11, 2, 0, 0, 0, 0]])
    levels = jnp.array([[2, 9, 0, 4, 1, 0, 0], [5, 0, 7, 0, 0, 0, 0]])
    sentences = dict(ids=ids, levels=levels, prefix_length=jnp.array([3, 2]),
                     target_length=jnp.array([2, 1]), valid=jnp.array([True, True]))
    loss, metrics = scmulan_objective.sentence_loss(model, sentences, mse_weight=0.5)
    logits, exp = (np.asarray(a) for a in model.heads(model(ids, levels)))
    bce, squares = [], []
    # (cell, position, {target still to come: its level}); <E> (0) once none remain
    cases = [(0, 2, {5: 4, 6: 1}), (0, 3, {6: 1}), (0, 4, {0: 0}), (1, 1, {2: 7}), (1, 2, {0: 0})]
    for b, t, targets in cases:
        y = np.zeros(12)
        y[list(targets)] = 1
        x = logits[b, t]
        bce.append(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))
        squares += [(exp[b, t, v] - level) ** 2 for v, level in targets.items()]
    np.testing.assert_allclose(metrics["bce"], np.mean(bce), rtol=1e-5)
    np.testing.assert_allclose(metrics["level_mse"], np.mean(squares), rtol=1e-5)
    np.testing.assert_allclose(loss, np.mean(bce) + 0.5 * np.mean(squares), rtol=1e-5)


def test_train_loop_pretrains_and_the_checkpoint_annotates(store, resolved, tmp_path):
    from scfm_jax.analysis import scmulan_tasks
    from scfm_jax.train import loop, partitioning
    from scfm_jax.train.checkpointing import Checkpoints
    from scfm_jax.train.trainer import Trainer
    from scfm_jax.objectives import get_objective

    summary = loop.train(resolved, tmp_path / "run", progress=False)
    losses = summary["losses"]
    steps = sorted(losses)
    assert np.isfinite(list(losses.values())).all()
    assert np.mean([losses[s] for s in steps[-5:]]) < np.mean([losses[s] for s in steps[:5]])

    # the checkpoint + the token set from its config -> zero-shot annotation of the store's cells
    trainer = Trainer(resolved, get_objective("scmulan"), partitioning.make_mesh(resolved.mesh))
    params = Checkpoints(tmp_path / "run", read_only=True).restore_state(
        trainer.abstract_sharded_state()).params
    model = scmulan.ScMulan(resolved.model, rngs=nnx.Rngs(0))
    nnx.update(model, params)
    token_set = scmulan_objective.token_set_from_config(resolved)
    cells = CellStore.open(store).to_anndata()
    scmulan_tasks.annotate(model, token_set, cells, counts=True, progress=False)
    # 30 tiny steps do not teach the types (that takes a few hundred); this checks the path
    assert cells.obsm["X_scmulan"].shape == (96, 32)
    assert set(cells.obs["cell_type_scmulan"]) <= set(TYPES) | {"Unclassified"}

    # the same through `scfm-jax annotate` on the workdir (token set from its saved config)
    from scfm_jax.main import main as scfm_main

    raw = CellStore.open(store).to_anndata()
    raw.write_h5ad(tmp_path / "cells.h5ad")
    assert scfm_main(["annotate", "--checkpoint", str(tmp_path / "run"), "--counts", "--quiet",
                      "--input", str(tmp_path / "cells.h5ad"),
                      "--output", str(tmp_path / "out.h5ad")]) == 0
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.obs["cell_type_scmulan"]) == list(cells.obs["cell_type_scmulan"])
    np.testing.assert_allclose(out.obsm["X_scmulan"], cells.obsm["X_scmulan"], atol=1e-5)


def test_remat_policies_give_the_same_outputs_kv_and_gradients():
    ids = jnp.array([[3, 4, 10, 5, 6, 0, 0], [7, 11, 2, 0, 0, 0, 0]])
    levels = jnp.array([[2, 9, 0, 4, 1, 0, 0], [5, 0, 7, 0, 0, 0, 0]])
    results = {}
    for policy in ("none", "full", "dots"):
        model = scmulan.ScMulan(dict(vocab_size=12, n_layer=3, n_head=2, n_embd=8,
                                     remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            hidden, kv = nnx.merge(graphdef, params, rest)(ids, levels, return_kv=True)
            return jnp.sum(jnp.tanh(hidden) ** 2), (hidden, kv)

        results[policy] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (_, (hidden, kv)), grads = results["none"]
    assert len(kv) == 2 and kv[0].shape == (3, 2, 7, 2, 4)  # keys, values: [layers, B, T, H, d]
    for policy in ("full", "dots"):
        (_, (other_hidden, other_kv)), other_grads = results[policy]
        np.testing.assert_allclose(other_hidden, hidden, rtol=1e-6, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     (other_kv, other_grads), (kv, grads))
