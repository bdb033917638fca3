"""Official scFoundation checkpoint import/export: exact round trip, strict key accounting."""
import sys

import numpy as np
import pytest

from shared_helpers import shared_path
from scfm_jax.interop import scfoundation_torch as interop


@pytest.fixture(scope="module")
def checkpoint():
    return shared_path("fixtures", "scfoundation-tiny", "models.ckpt")


@pytest.fixture(scope="module")
def official(checkpoint):
    return {key: interop.read_official_checkpoint(checkpoint, key) for key in ("gene", "cell", "rde")}


def test_config_from_checkpoint(checkpoint):
    config, model = interop.load_official_checkpoint(checkpoint, "gene")
    assert config.num_genes == 200 and model.num_genes == 200
    assert (config.bin_num, config.mask_value, config.pad_value) == (10, 102.0, 103.0)
    assert (config.encoder.width, config.encoder.depth, config.encoder.heads,
            config.encoder.mlp_dim) == (32, 2, 4, 128)
    assert (config.decoder.width, config.decoder.depth, config.decoder.heads,
            config.decoder.head_dim, config.decoder.mlp_dim,
            config.decoder.num_features) == (24, 2, 3, 8, 96, 16)


@pytest.mark.parametrize("key", ["gene", "cell", "rde"])
def test_round_trip_is_exact(checkpoint, official, key):
    _, model = interop.load_official_checkpoint(checkpoint, key)
    exported = interop.export_official_state_dict(model)
    _, state_dict = official[key]
    original = {name.removeprefix("model."): value for name, value in state_dict.items()}
    assert set(exported) == set(original)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_weight_sets_differ(official):
    # a loader that read the wrong key would fail the fidelity tests; make sure they can tell
    name = "model.to_final.weight"
    assert not np.array_equal(official["gene"][1][name], official["cell"][1][name])


def test_npz_state_dict(tmp_path, checkpoint, official):
    config, model = interop.load_official_checkpoint(checkpoint, "cell")
    path = tmp_path / "cell.npz"
    np.savez(path, **interop.export_official_state_dict(model))
    loaded = interop.load_official_state_dict(path, config)
    original = official["cell"][1]
    exported = interop.export_official_state_dict(loaded)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name.removeprefix("model.")], value)


def test_missing_extra_and_misshapen_tensors_are_named(checkpoint, official):
    official_config, state_dict = official["gene"]
    config = interop.model_config_from_official(official_config, state_dict)
    missing = dict(state_dict)
    del missing["model.decoder.performer.net.layers.1.0.fn.fast_attention.projection_matrix"]
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.0\.fn\.fast_attention"):
        interop.load_official_state_dict(missing, config)
    extra = dict(state_dict, **{"model.head.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"not used by the model: head\.weight"):
        interop.load_official_state_dict(extra, config)
    misshapen = dict(state_dict)
    misshapen["model.norm.weight"] = np.zeros(25, np.float32)
    with pytest.raises(ValueError, match=r"norm\.weight: shape \(25,\)"):
        interop.load_official_state_dict(misshapen, config)
    wrong_architecture = config.copy_and_resolve_references()
    wrong_architecture.decoder.depth = 3
    with pytest.raises(ValueError, match=r"missing .*layers\.2\..*\n.*not filled: decoder_layers\.2"):
        interop.load_official_state_dict(state_dict, wrong_architecture)


def test_wrong_checkpoint_key(checkpoint):
    with pytest.raises(KeyError, match=r"no weight set 'ce'.*'gene', 'cell', 'rde'"):
        interop.load_official_checkpoint(checkpoint, "ce")


def test_loads_without_torch(monkeypatch, checkpoint, official):
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    _, model = interop.load_official_checkpoint(checkpoint, "cell")
    exported = interop.export_official_state_dict(model)
    for name, value in official["cell"][1].items():
        np.testing.assert_array_equal(exported[name.removeprefix("model.")], value)
