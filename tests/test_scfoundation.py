"""scFoundation against the original PyTorch outputs (fixture scfoundation-tiny), the parameter
count of the released architecture, the device input functions and the pretraining loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared_helpers import shared_path
from scfm_jax.analysis import scfoundation_inference as inference
from scfm_jax.configs import scfoundation_100m, scfoundation_tiny
from scfm_jax.data.vocabulary import align_genes, load_vocabulary
from scfm_jax.interop.scfoundation_torch import load_official_checkpoint
from scfm_jax.models import performer
from scfm_jax.models import scfoundation as sf
from scfm_jax.objectives import scfoundation as sf_objective

ATOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    folder = shared_path("fixtures", "scfoundation-tiny")
    cells = np.load(folder / "cells.npz")
    vocabulary = load_vocabulary(folder / "genes.tsv")
    aligned = align_genes(cells["gene_names"], vocabulary, warn_duplicates=False).apply(
        cells["counts"], min_fraction=None)
    models = {key: load_official_checkpoint(folder / "models.ckpt", key)[1]
              for key in ("cell", "gene", "rde")}
    return dict(expected=dict(np.load(folder / "expected.npz")), aligned=aligned, models=models,
                cell_ids=cells["cell_ids"])


def _close(actual, expected, name):
    """1e-5 absolute, or relative for large values."""
    np.testing.assert_allclose(actual, expected, rtol=ATOL, atol=ATOL, err_msg=name)


def test_alignment_reproduces_main_gene_selection(fixture):
    np.testing.assert_array_equal(fixture["aligned"].toarray(), fixture["expected"]["aligned_counts"])


@pytest.mark.parametrize("tgthighres", ["t4", "f1", "a5"])
def test_inference_inputs_match_get_embedding(fixture, tgthighres):
    expected = fixture["expected"]
    csr, totals, options = inference.prepare(fixture["aligned"], 200)
    np.testing.assert_array_equal(totals, expected["total_counts"])
    batch = next(inference._batches(csr, 200, 8, single_bucket=True))[1]
    batch["total_counts"] = totals.astype(np.float32)
    inputs = sf_objective.inference_inputs(batch, num_genes=200, tgthighres=tgthighres)
    _close(inputs["decoder_values"], expected[f"model_input_{tgthighres}"], tgthighres)
    # encoder tokens: the expressed genes in order, then T, then S
    lengths = np.asarray(inputs["encoder_lengths"])
    np.testing.assert_array_equal(lengths, np.diff(csr.indptr) + 2)
    ids = np.asarray(inputs["encoder_gene_ids"])
    for cell in range(8):
        np.testing.assert_array_equal(ids[cell, :lengths[cell]],
                                      np.r_[csr.indices[csr.indptr[cell]:csr.indptr[cell + 1]],
                                            200, 201])


@pytest.mark.parametrize("tgthighres, pool, name", [
    ("t4", "all", "cell_emb_t4"), ("f1", "all", "cell_emb_f1"), ("a5", "max", "cell_emb_a5_max")])
def test_cell_embeddings(fixture, tgthighres, pool, name):
    out = inference.cell_embeddings(fixture["models"]["cell"], fixture["aligned"],
                                    tgthighres=tgthighres, pool=pool, batch_size=4, progress=False)
    _close(out, fixture["expected"][name], name)


def test_gene_embeddings_per_cell_and_batch(fixture):
    model, aligned, expected = fixture["models"]["gene"], fixture["aligned"], fixture["expected"]
    per_cell = inference.gene_embeddings(model, aligned, batch_size=4, progress=False)
    _close(per_cell, expected["gene_emb_percell"], "gene_emb_percell")
    batch = inference.gene_embeddings(model, aligned, batch_size=8, stabilizer_scope="batch",
                                      progress=False)
    _close(batch, expected["gene_emb_batch"], "gene_emb_batch")


def test_predicted_expression_rde(fixture):
    out = inference.predicted_expression(fixture["models"]["rde"], fixture["aligned"],
                                         tgthighres="a5", batch_size=4, progress=False)
    _close(out, fixture["expected"]["expr_rde_a5"], "expr_rde_a5")


def test_masked_forward_and_mse(fixture):
    expected, model = fixture["expected"], fixture["models"]["gene"]
    inputs = sf_objective.inputs_from_dense_values(expected["masked_values"], num_genes=200)
    predictions = model(inputs["encoder_values"], inputs["encoder_gene_ids"],
                        inputs["encoder_padding_mask"], inputs["decoder_values"],
                        stabilizer_scope="batch")
    _close(predictions, expected["masked_pred"], "masked_pred")
    mse = sf_objective.masked_mse(predictions, expected["masked_target"], expected["mask_positions"])
    _close(mse, expected["masked_mse"], "masked_mse")


def test_parameter_count_of_released_architecture():
    config = scfoundation_100m.get_config().model
    assert config.num_genes == 19264
    abstract = nnx.eval_shape(lambda: ScFoundationFactory(config))
    params = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(p.shape)) for p in params) == 119_252_285
    projections = jax.tree.leaves(nnx.state(abstract, performer.ProjectionMatrix))
    assert [p.shape for p in projections] == [(6, 266, 64)]  # stacked over the 6 layers
    # every parameter names a logical axis per dimension, all known to the rules table
    known = {name for name, _ in scfoundation_tiny.LOGICAL_AXIS_RULES} | {None}
    for path, variable in nnx.to_flat_state(nnx.state(abstract)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(variable.get_value().shape), path
        assert set(names) <= known, (path, names)


def ScFoundationFactory(config):
    return sf.ScFoundation(config, rngs=nnx.Rngs(0))


def test_num_genes_must_be_set():
    config = scfoundation_tiny.get_config().model
    with pytest.raises(ValueError, match="num_genes"):
        sf.ScFoundation(config, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ pretraining inputs / loss

def _tiny_config(num_genes=40, **model):
    config = scfoundation_tiny.get_config()
    config.model.num_genes = num_genes
    config.model.update(model)
    return config


def _synthetic_batch(cells=64, width=24, num_genes=300, seed=0):
    rng = np.random.default_rng(seed)
    gene_ids = np.full((cells, width), -1, np.int32)
    counts = np.zeros((cells, width), np.float32)
    nonzero = rng.integers(3, width + 1, cells)
    for cell, n in enumerate(nonzero):
        gene_ids[cell, :n] = np.sort(rng.choice(num_genes, n, replace=False))
        counts[cell, :n] = rng.integers(1, 400, n)
    totals = counts.sum(1)
    return dict(gene_ids=gene_ids, counts=counts, total_counts=totals.astype(np.float32),
                num_nonzero=nonzero.astype(np.int32))


def test_pretraining_inputs():
    objective = scfoundation_tiny.get_config().objective
    objective.downsample_min_total = 2500
    batch = _synthetic_batch()
    num_genes = 300
    key = jax.random.key(0)
    inputs, targets, mask, thinned = sf_objective.pretraining_inputs(batch, key, num_genes=num_genes,
                                                           objective=objective)
    again = sf_objective.pretraining_inputs(batch, key, num_genes=num_genes, objective=objective)
    jax.tree.map(np.testing.assert_array_equal, (inputs, targets, mask, thinned), again)
    inputs, targets, mask, thinned = jax.tree.map(np.asarray, (inputs, targets, mask, thinned))
    totals = batch["total_counts"]
    # only cells at or above the minimum total are thinned, and about the configured fraction
    assert not np.any(thinned & (totals < 2500))
    eligible = totals >= 2500
    assert 0.2 < thinned[eligible].mean() < 0.8
    # targets: the normalised original cell; T from the original total, S from the thinned one
    dense = np.zeros((64, num_genes + 2))
    for cell in range(64):
        n = batch["num_nonzero"][cell]
        dense[cell, batch["gene_ids"][cell, :n]] = np.log1p(
            batch["counts"][cell, :n].astype(np.float64) / totals[cell] * 1e4)
    np.testing.assert_allclose(targets[:, :num_genes], dense[:, :num_genes], rtol=1e-6)
    t, s = inputs["decoder_values"][:, num_genes], inputs["decoder_values"][:, num_genes + 1]
    np.testing.assert_allclose(t, np.log10(totals), rtol=1e-6)
    np.testing.assert_allclose(s[~thinned], t[~thinned], rtol=1e-6)
    assert np.all(s[thinned] < t[thinned])
    # masking: about 30% of the non-zero input genes and 3% of the zero genes; T, S never
    decoder = inputs["decoder_values"]
    assert not mask[:, num_genes:].any()
    np.testing.assert_array_equal(decoder[mask], 102.0)
    unthinned = ~thinned
    nonzero_genes = targets[unthinned, :num_genes] > 0
    assert 0.22 < mask[unthinned, :num_genes][nonzero_genes].mean() < 0.38
    assert 0.02 < mask[:, :num_genes][targets[:, :num_genes] == 0].mean() < 0.04
    # the encoder sees exactly the unmasked non-zero inputs, then T and S
    for cell in range(64):
        n = inputs["encoder_lengths"][cell]
        ids = inputs["encoder_gene_ids"][cell, :n]
        expected = np.flatnonzero((decoder[cell, :num_genes] > 0) & ~mask[cell, :num_genes])
        np.testing.assert_array_equal(ids, np.r_[expected, num_genes, num_genes + 1])
        np.testing.assert_array_equal(inputs["encoder_values"][cell, :n - 2],
                                      decoder[cell, expected])
        assert np.all(inputs["encoder_padding_mask"][cell, n:])
    # cells that are not thinned feed their original values wherever unmasked
    unmasked = ~mask[unthinned, :num_genes]
    np.testing.assert_array_equal(decoder[unthinned, :num_genes][unmasked],
                                  targets[unthinned, :num_genes][unmasked])


@pytest.fixture(scope="module")
def loss_setup():
    config = _tiny_config(num_genes=300)
    batch = {k: jnp.asarray(v) for k, v in _synthetic_batch(cells=4).items()}
    return config, batch, _loss_and_grads(config, batch)


def _loss_and_grads(config, batch):
    model = sf.ScFoundation(config.model, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest, batch):
        def loss_fn(params):
            merged = nnx.merge(graphdef, params, rest)
            return sf_objective.pretraining_loss(merged, batch, jax.random.key(3), config.objective)
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, metrics), grads = run(params, rest, batch)
    return float(loss), metrics, grads


def test_pretraining_loss_and_remat_policies(loss_setup):
    config, batch, (loss, metrics, grads) = loss_setup
    assert np.isfinite(loss) and loss > 0
    assert metrics["masked_positions"] > 0
    assert set(metrics) >= {"loss", "mse_nonzero_targets", "mse_zero_targets"}
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    for policy in ("full", "dots"):
        remat_config = _tiny_config(num_genes=300, remat_policy=policy)
        remat_loss, _, remat_grads = _loss_and_grads(remat_config, batch)
        np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     remat_grads, grads)


def test_full_remat_cuts_the_compiled_train_memory():
    """Per-layer remat must really recompute one layer at a time (an unrolled jax.checkpoint
    saved nothing on XLA:CPU): compare XLA's temp memory for the gradient, nothing is run."""
    batch = {k: jnp.asarray(v) for k, v in _synthetic_batch(cells=2).items()}
    temp = {}
    for policy in ("none", "full"):
        config = _tiny_config(num_genes=4000, remat_policy=policy)
        config.model.decoder.update(depth=6, mlp_dim=256)
        model = sf.ScFoundation(config.model, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, rest, batch):
            merged = nnx.merge(graphdef, params, rest)
            return sf_objective.pretraining_loss(merged, batch, jax.random.key(3), config.objective)[0]

        compiled = jax.jit(jax.grad(loss_fn)).lower(params, rest, batch).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.5 * temp["none"], temp


@pytest.mark.slow
@pytest.mark.heavy
def test_pretraining_loss_bfloat16_and_dropout(loss_setup):
    config, batch, (loss, _, _) = loss_setup
    bf16 = _tiny_config(num_genes=300, dtype="bfloat16")
    bf16_loss, _, grads = _loss_and_grads(bf16, batch)
    assert abs(bf16_loss - loss) < 0.05 * loss
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    dropout = _tiny_config(num_genes=300)
    dropout.model.encoder.dropout = 0.1
    dropout_loss, _, _ = _loss_and_grads(dropout, batch)
    assert np.isfinite(dropout_loss) and dropout_loss != loss


def test_pooling_with_lengths():
    encoded = jax.random.normal(jax.random.key(0), (2, 6, 3))
    lengths = jnp.array([6, 4])
    pooled = np.asarray(sf.pool_cell_embeddings(encoded, lengths, "all"))
    e = np.asarray(encoded)
    np.testing.assert_allclose(pooled[1], np.r_[e[1, 3], e[1, 2], e[1, :2].max(0), e[1, :2].mean(0)],
                               rtol=1e-6)
    np.testing.assert_allclose(sf.pool_cell_embeddings(encoded, lengths, "max")[1], e[1, :4].max(0))


def test_depth_tokens_and_bad_tgthighres():
    total = jnp.array([100.0])
    assert float(sf_objective.depth_tokens(total, "t4.5")[0][0]) == 4.5
    np.testing.assert_allclose(sf_objective.depth_tokens(total, "f10")[0], [3.0])
    np.testing.assert_allclose(sf_objective.depth_tokens(total, "a5")[0], [7.0])
    with pytest.raises(ValueError, match="tgthighres"):
        sf_objective.depth_tokens(total, "x4")
