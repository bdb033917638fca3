"""scMulan model, KV-cache generation and annotation against the original PyTorch outputs.

The fixture (`../shared/fixtures/scmulan-tiny/`) holds an official-layout checkpoint with random
weights, six real cells and what the original code produced for them.
"""
import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from flax import nnx

from shared_helpers import shared_path
from scfm_jax.analysis import scmulan_tasks
from scfm_jax.data import cell_sentence
from scfm_jax.interop import scmulan_torch, torch_checkpoint
from scfm_jax.models import generation, scmulan

TOL = 1e-5


@pytest.fixture(scope="module")
def fixture():
    folder = shared_path("fixtures", "scmulan-tiny")
    model_config, model = scmulan_torch.load_official_checkpoint(folder / "ckpt.pt")
    return dict(folder=folder, model_config=model_config, model=model,
                token_set=cell_sentence.TokenSet.from_folder(folder),
                cells=np.load(folder / "cells.npz"), expected=np.load(folder / "expected.npz"))


@pytest.fixture(scope="module")
def annotated(fixture):
    cells = fixture["cells"]
    adata = anndata.AnnData(scipy.sparse.csr_matrix(cells["expr"]),
                            obs=pd.DataFrame(index=cells["cell_ids"]),
                            var=pd.DataFrame(index=list(fixture["token_set"].genes)))
    # batch 4 for 6 cells: two batches, the second padded with a repeated cell
    return scmulan_tasks.annotate(fixture["model"], fixture["token_set"], adata, batch_size=4,
                                  progress=False)


def test_checkpoint_config(fixture):
    config = fixture["model_config"]
    assert (config.name, config.vocab_size, config.n_layer, config.n_head, config.n_embd,
            config.bias) == ("scmulan", 2222, 2, 4, 64, False)


def test_batched_forward_matches_original(fixture):
    expected, token_set, model = fixture["expected"], fixture["token_set"], fixture["model"]
    prompts = cell_sentence.annotation_prompts(fixture["cells"]["expr"], token_set)
    ids, levels, lengths = cell_sentence.pad_prompts(prompts)
    np.testing.assert_array_equal(lengths, expected["prompt_len"])
    hidden = scmulan.last_valid(model(jnp.asarray(ids), jnp.asarray(levels)), jnp.asarray(lengths))
    logits_cls, logits_exp = model.heads(hidden)
    np.testing.assert_allclose(hidden, expected["hidden_last_valid"], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits_cls, expected["logits_cls_last"], atol=TOL, rtol=0)
    np.testing.assert_allclose(logits_exp, expected["logits_exp_last"], atol=TOL, rtol=0)


def test_generation_matches_original(fixture):
    expected = fixture["expected"]
    prompts = cell_sentence.annotation_prompts(fixture["cells"]["expr"], fixture["token_set"])
    out = generation.generate(fixture["model"], *cell_sentence.pad_prompts(prompts),
                              max_new_tokens=3)
    for i in range(len(prompts)):
        np.testing.assert_array_equal(out.tokens(i), expected[f"gen_ids_{i}"])
        np.testing.assert_array_equal(out.token_levels(i), expected[f"gen_levels_{i}"])
    np.testing.assert_allclose(out.embedding, expected["cell_emb"], atol=TOL, rtol=0)


def test_annotate_matches_original(fixture, annotated):
    expected = fixture["expected"]
    assert list(annotated.obs["cell_type_scmulan"]) == list(expected["pred_cell_type"])
    assert list(annotated.obs["cell_type_scmulan_coarse"]) == list(expected["pred_coarse_type"])
    np.testing.assert_allclose(annotated.obsm["X_scmulan"], expected["cell_emb"], atol=TOL, rtol=0)
    # the coarse type is the first generated token (all six cells generate three): its
    # probability is the softmax of the original's logits at the prompt's end, with the prompt's
    # tokens before its last one banned
    coarse_probability = annotated.obs["cell_type_scmulan_coarse_probability"].to_numpy()
    for cell in range(len(expected["prompt_len"])):
        logits = expected["logits_cls_last"][cell].astype(np.float64)
        logits[expected[f"ids_{cell}"][:-1]] = -np.inf
        wanted = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        if expected["pred_coarse_type"][cell] == scmulan_tasks.UNCLASSIFIED:
            assert np.isnan(coarse_probability[cell])
        else:
            np.testing.assert_allclose(coarse_probability[cell],
                                       wanted[expected[f"gen_ids_{cell}"][0]], atol=TOL)
    fine_probability = annotated.obs["cell_type_scmulan_probability"].to_numpy()
    classified = annotated.obs["cell_type_scmulan"].to_numpy() != scmulan_tasks.UNCLASSIFIED
    assert np.isnan(fine_probability[~classified]).all()
    assert ((fine_probability[classified] > 0) & (fine_probability[classified] <= 1)).all()


def _reference_generate(model, prompt_ids, prompt_levels, max_new_tokens):
    """The official loop: one cell, a full forward per step, ban positions [:-1], greedy.
    (Each forward is right-padded to one width so it compiles once; that is exact, SPEC II.8.)"""
    width = 32
    forward = nnx.jit(lambda m, i, lv: m(i, lv))
    ids, levels, probabilities = list(prompt_ids), list(prompt_levels), []
    while True:
        pad = width - len(ids)
        hidden = np.asarray(forward(model, jnp.asarray([ids + [0] * pad]),
                                    jnp.asarray([levels + [0] * pad]))[0, :len(ids)])
        logits, exp = (np.array(a, np.float64) for a in model.heads(jnp.asarray(hidden[-1])))
        logits[np.array(ids[:-1], int)] = -np.inf
        token = int(np.argmax(logits))
        probabilities.append(1.0 / np.exp(logits - logits[token]).sum())
        ids.append(token)
        levels.append(int(np.clip(np.round(exp[token]), 0, model.cfg.expression_level)))
        if token == 0 or len(ids) >= len(prompt_ids) + max_new_tokens:
            break
    embedding = hidden[-2] if len(hidden) >= 2 else None
    return ids[len(prompt_ids):], levels[len(prompt_ids):], probabilities, embedding


def test_kv_cache_generation_matches_full_forward_loop():
    # a random model generating long sequences with repeated tokens in the prompts: the cache,
    # the per-cell positions, the ban of earlier tokens and the exemption of the last one
    config = dict(vocab_size=40, n_layer=2, n_head=2, n_embd=16, expression_level=10)
    model = scmulan.ScMulan(config, rngs=nnx.Rngs(3))
    model.epx_head[...] = model.epx_head[...] * 300.0  # levels spread over 0..10
    rng = np.random.default_rng(0)
    prompts = [(rng.integers(1, 40, n).astype(np.int32), rng.integers(0, 11, n).astype(np.int32))
               for n in (3, 9, 5, 1)]
    prompts[1][0][-1] = prompts[1][0][0]  # the last token also appears earlier: it is banned
    out = generation.generate(model, *cell_sentence.pad_prompts(prompts), max_new_tokens=12)
    for i, (ids, levels) in enumerate(prompts):
        ref_ids, ref_levels, ref_probabilities, ref_embedding = _reference_generate(
            model, ids, levels, 12)
        np.testing.assert_array_equal(out.tokens(i), ref_ids)
        np.testing.assert_array_equal(out.token_levels(i), ref_levels)
        np.testing.assert_allclose(out.token_probabilities(i), ref_probabilities, atol=TOL)
        if ref_embedding is not None:
            np.testing.assert_allclose(out.embedding[i], ref_embedding, atol=TOL, rtol=0)
        assert len(set(ref_ids[:-1]) & set(ids[:-1].tolist())) == 0


def test_ignore_ids_and_sampling_rules():
    config = dict(vocab_size=30, n_layer=1, n_head=2, n_embd=8)
    model = scmulan.ScMulan(config, rngs=nnx.Rngs(1))
    ids, levels, lengths = cell_sentence.pad_prompts([(np.array([5, 6], np.int32),
                                                       np.zeros(2, np.int32))] * 4)
    greedy = generation.generate(model, ids, levels, lengths, max_new_tokens=6)
    banned = np.unique(greedy.ids[greedy.ids >= 0])
    other = generation.generate(model, ids, levels, lengths, max_new_tokens=6, ignore_ids=banned)
    assert not np.isin(other.ids[other.ids >= 0], banned).any()
    sampled = generation.generate(model, ids, levels, lengths, max_new_tokens=6, top_k=0,
                                  gamma=0.0, key=jax.random.key(5))
    assert not (sampled.ids == 0).any()  # gamma 0 removes the end token
    assert (sampled.num_generated == 6).all()


def test_export_round_trip(fixture, tmp_path):
    torch = pytest.importorskip("torch")
    original = torch.load(fixture["folder"] / "ckpt.pt", weights_only=True)
    exported = scmulan_torch.export_official_state_dict(fixture["model"])
    assert list(exported) == list(original["model"])
    for key, value in original["model"].items():
        assert torch.equal(exported[key], value), key
    path = tmp_path / "again.pt"
    scmulan_torch.save_official_checkpoint(fixture["model"], path)
    _, again = scmulan_torch.load_official_checkpoint(path)
    for key, value in scmulan_torch.state_dict_arrays(again).items():
        np.testing.assert_array_equal(value, original["model"][key].numpy())


def test_bias_checkpoint_round_trip(tmp_path):
    model = scmulan.ScMulan(dict(vocab_size=20, n_layer=2, n_head=2, n_embd=8, bias=True),
                            rngs=nnx.Rngs(0))
    model.blocks.fc_bias[...] = jnp.arange(64.0).reshape(2, 32) / 7  # differs per layer
    path = tmp_path / "bias.pt"
    scmulan_torch.save_official_checkpoint(model, path)
    _, loaded = scmulan_torch.load_official_checkpoint(path)
    ids = jnp.array([[1, 2, 3]])
    np.testing.assert_array_equal(model(ids, ids), loaded(ids, ids))


def test_checkpoint_errors_name_the_problem(fixture, tmp_path):
    checkpoint = torch_checkpoint.load(fixture["folder"] / "ckpt.pt")
    checkpoint["model"]["transformer.wpe.weight"] = np.zeros((3, 64), np.float32)
    torch_checkpoint.save(checkpoint, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        scmulan_torch.load_official_checkpoint(tmp_path / "extra.pt")
    del checkpoint["model"]["transformer.wpe.weight"]
    checkpoint["model"]["lm_head.weight"] = np.zeros((2222, 32), np.float32)
    torch_checkpoint.save(checkpoint, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        scmulan_torch.load_official_checkpoint(tmp_path / "shape.pt")
    torch_checkpoint.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="model_args"):
        scmulan_torch.load_official_checkpoint(tmp_path / "other.pt")


def test_parameters_carry_logical_axes():
    model = scmulan.ScMulan(dict(vocab_size=20, n_layer=1, n_head=2, n_embd=8, bias=True),
                            rngs=nnx.Rngs(0))
    for path, param in nnx.state(model, nnx.Param).flat_state():
        names = param.get_metadata().get("out_sharding")
        assert names is not None and len(names) == param[...].ndim, path


def test_released_size_config():
    from scfm_jax.configs import scmulan_368m

    config = scmulan_368m.get_config()
    assert config.model.n_head == 16
    assert scmulan.count_parameters(config.model) == 368_800_320


def test_released_size_config_keeps_only_bfloat16_layer_inputs_for_the_backward():
    """The 368M defaults (bfloat16 activations, full remat) keep one bfloat16 [layers, B, T, D]
    tensor of the layer scan for the backward pass. The old ones (float32, "dots") kept every
    matmul output of every layer in float32 (q/k/v, the attention output, the 4 x D MLP hidden):
    the v5e-8 step's largest memory traffic (docs/speed.md)."""
    import contextlib
    import io

    import jax.ad_checkpoint
    from scfm_jax.configs import scmulan_368m

    config = scmulan_368m.get_config()
    config.model.update(vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    graphdef, state = nnx.split(scmulan.ScMulan(config.model, rngs=nnx.Rngs(0)))
    ids = jnp.zeros((3, 40), jnp.int32)

    def loss(state):
        model = nnx.merge(graphdef, state)
        return sum(head.sum() for head in model.heads(model(ids, ids)))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, state)
    layer_scan = [line.split()[0] for line in printed.getvalue().splitlines()
                  if "output of scan" in line]
    assert layer_scan == ["bf16[2,3,40,16]"]


def test_released_size_config_shares_weight_traffic_among_16_cells_per_chip():
    """On a v5e-8 (FSDP over its 8 chips) each micro-step of the 368M defaults holds 16 cells per
    chip: at 1 cell per chip the weight gathers and gradient updates of every layer dominated the
    step (12% roofline MFU in bfloat16), at 16 it is 37% with 47% HBM headroom (docs/speed.md)."""
    from scfm_jax.configs import scmulan_368m

    config = scmulan_368m.get_config()
    assert (config.mesh.data, config.mesh.fsdp) == (1, -1)
    assert config.data.global_batch_size // config.train.grad_accum_steps // 8 == 16


def test_conditional_generation_returns_levels(fixture):
    conditions = [["Heart", "Cardiomyocyte cell", "50 year", "M"], ["Lung", "T cell"]] * 2
    cells = scmulan_tasks.generate_cells(fixture["model"], fixture["token_set"], conditions,
                                         max_new_tokens=24, top_k=20, seed=3, batch_size=4,
                                         progress=False)
    assert cells.shape == (4, 2000) and list(cells.var_names) == list(fixture["token_set"].genes)
    levels = cells.X.toarray()
    assert levels.min() >= 0 and levels.max() <= 10 and (levels > 0).sum() > 0
    assert list(cells.obs["condition"])[:2] == ["Heart, Cardiomyocyte cell, 50 year, M",
                                                "Lung, T cell"]
    # same prompt, different samples
    assert not np.array_equal(levels[0], levels[2])


def test_smoothing_votes_among_neighbours():
    rng = np.random.default_rng(0)
    centres = np.repeat(np.eye(3) * 10, 10, axis=0)
    adata = anndata.AnnData(np.zeros((30, 1)))
    adata.obsm["X_scmulan"] = centres + rng.normal(0, 0.1, (30, 3))
    labels = np.repeat(["A", "B", "C"], 10).astype(object)
    labels[[3, 14]] = "noise"
    adata.obs["cell_type_scmulan"] = pd.Categorical(labels)
    scmulan_tasks.smooth_cell_types(adata, n_neighbors=6)
    assert list(adata.obs["cell_type_scmulan_smoothed"]) == list(np.repeat(["A", "B", "C"], 10))
