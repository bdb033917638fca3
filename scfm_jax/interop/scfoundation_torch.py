"""Official scFoundation checkpoints (`models.ckpt`, PyTorch) <-> our ScFoundation.

The released `models.ckpt` is a torch pickle holding three weight sets, `gene`, `cell` and `rde`,
each `{"config": {...}, "state_dict": {"model.<key>": tensor}}` (SPEC.md I.5, I.7). Importing one
of them builds the model config from the checkpoint's own config and shapes, then fills every
variable of the model from the state dict: every source tensor must be consumed and every
variable filled, otherwise the import fails naming the keys. Export writes the official naming
back (a state dict `MaeAutobin.load_state_dict` accepts), so a round trip is exact.

`.ckpt` files are read without PyTorch by `torch_checkpoint`, which refuses any pickle that names
more than weights need; `.npz` state dicts and dicts of numpy arrays load as well.
"""
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from scfm_jax.errors import CheckpointError, MissingCheckpoint, UnknownCheckpointKey
from scfm_jax.interop import torch_checkpoint
from scfm_jax.models.scfoundation import (DecoderConfig, EncoderConfig, ScFoundation,
                                          ScFoundationConfig)

CHECKPOINT_KEYS = ("gene", "cell", "rde")
# Bookkeeping buffers of the original that carry no model state.
IGNORED_KEYS = ("decoder.performer.calls_since_last_redraw",)
_ENCODER = "encoder.transformer_encoder.{}."
_DECODER = "decoder.performer.net.layers.{}."


# A rule converts a group of official tensors into a group of our variables and back.
Rule = tuple[tuple[str, ...], tuple[tuple, ...], Callable, Callable]


def _identity(torch_keys, paths) -> Rule:
    return (tuple(torch_keys), tuple(paths), lambda arrays: arrays, lambda arrays: arrays)


def _linear(prefix: str, path: tuple) -> Rule:
    """torch Linear weight [out, in] + bias <-> nnx.Linear kernel [in, out] + bias."""
    return ((prefix + "weight", prefix + "bias"), (path + ("kernel",), path + ("bias",)),
            lambda a: [a[0].T, a[1]], lambda a: [a[0].T, a[1]])


def _layer_norm(prefix: str, path: tuple) -> Rule:
    return _identity((prefix + "weight", prefix + "bias"), (path + ("scale",), path + ("bias",)))


def _heads_in(prefix: str, path: tuple, heads: int, head_dim: int) -> Rule:
    """Linear to heads*head_dim (head-major, as `b n (h d)`) <-> LinearGeneral [in, H, d]."""
    def to_ours(a):
        return [a[0].T.reshape(a[0].shape[1], heads, head_dim), a[1].reshape(heads, head_dim)]

    def to_official(a):
        return [a[0].reshape(a[0].shape[0], heads * head_dim).T, a[1].reshape(heads * head_dim)]

    return ((prefix + "weight", prefix + "bias"), (path + ("kernel",), path + ("bias",)),
            to_ours, to_official)


def _heads_out(prefix: str, path: tuple, heads: int, head_dim: int) -> Rule:
    """Linear from heads*head_dim <-> LinearGeneral kernel [H, d, out]."""
    def to_ours(a):
        return [a[0].T.reshape(heads, head_dim, a[0].shape[0]), a[1]]

    def to_official(a):
        return [a[0].reshape(heads * head_dim, a[0].shape[2]).T, a[1]]

    return ((prefix + "weight", prefix + "bias"), (path + ("kernel",), path + ("bias",)),
            to_ours, to_official)


def _fused_qkv(prefix: str, path: tuple, heads: int, head_dim: int) -> Rule:
    """torch MHA in_proj_weight [3W, W] (rows q, k, v) <-> three LinearGeneral [W, H, d]."""
    names = ("query", "key", "value")
    paths = tuple(path + (name, leaf) for name in names for leaf in ("kernel", "bias"))

    def to_ours(a):
        weights, biases = np.split(a[0], 3, axis=0), np.split(a[1], 3, axis=0)
        out = []
        for weight, bias in zip(weights, biases):
            out += [weight.T.reshape(weight.shape[1], heads, head_dim), bias.reshape(heads, head_dim)]
        return out

    def to_official(a):
        kernels, biases = a[0::2], a[1::2]
        weight = np.concatenate([k.reshape(k.shape[0], heads * head_dim).T for k in kernels], 0)
        return [weight, np.concatenate([b.reshape(heads * head_dim) for b in biases], 0)]

    return ((prefix + "in_proj_weight", prefix + "in_proj_bias"), paths, to_ours, to_official)


def _rules(config: ScFoundationConfig) -> list[Rule]:
    enc, dec = config.encoder, config.decoder
    enc_head_dim = enc.width // enc.heads
    rules = [
        _linear("token_emb.mlp.", ("token_emb", "mlp")),
        _linear("token_emb.mlp2.", ("token_emb", "mlp2")),
        _identity(["token_emb.emb.weight", "token_emb.emb_mask.weight", "token_emb.emb_pad.weight"],
                  [("token_emb", "emb"), ("token_emb", "emb_mask"), ("token_emb", "emb_pad")]),
        _identity(["pos_emb.weight"], [("pos_emb", "embedding")]),
        _layer_norm("encoder.norm.", ("encoder_norm",)),
        _linear("decoder_embed.", ("decoder_embed",)),
        _layer_norm("decoder.norm.", ("decoder_norm",)),
        _layer_norm("norm.", ("norm",)),
        _linear("to_final.", ("to_final",)),
    ]
    for i in range(enc.depth):
        prefix, path = _ENCODER.format(i), ("encoder_layers", i)
        rules += [
            _fused_qkv(prefix + "self_attn.", path + ("attention",), enc.heads, enc_head_dim),
            _heads_out(prefix + "self_attn.out_proj.", path + ("attention", "out"), enc.heads,
                       enc_head_dim),
            _linear(prefix + "linear1.", path + ("feed_forward", "w1")),
            _linear(prefix + "linear2.", path + ("feed_forward", "w2")),
            _layer_norm(prefix + "norm1.", path + ("norm1",)),
            _layer_norm(prefix + "norm2.", path + ("norm2",)),
        ]
    for i in range(dec.depth):
        prefix, path = _DECODER.format(i), ("decoder_layers", i)
        attention = path + ("attention",)
        rules += [
            _layer_norm(prefix + "0.norm.", path + ("attention_norm",)),
            _heads_in(prefix + "0.fn.to_q.", attention + ("query",), dec.heads, dec.head_dim),
            _heads_in(prefix + "0.fn.to_k.", attention + ("key",), dec.heads, dec.head_dim),
            _heads_in(prefix + "0.fn.to_v.", attention + ("value",), dec.heads, dec.head_dim),
            _heads_out(prefix + "0.fn.to_out.", attention + ("out",), dec.heads, dec.head_dim),
            _layer_norm(prefix + "1.norm.", path + ("feed_forward_norm",)),
            _linear(prefix + "1.fn.fn.w1.", path + ("feed_forward", "w1")),
            _linear(prefix + "1.fn.fn.w2.", path + ("feed_forward", "w2")),
        ]
        if dec.attention == "performer":
            rules.append(_identity([prefix + "0.fn.fast_attention.projection_matrix"],
                                   [attention + ("projection",)]))
    return rules


def _slots(model: nnx.Module) -> dict[tuple, tuple[nnx.Variable, int | None]]:
    """Every variable under the per-layer path the rules name: a stacked variable (leading
    `layers` axis) of `encoder_layers` / `decoder_layers` gives one slot per layer,
    `("decoder_layers", i, ...) -> (variable, i)`; the others `path -> (variable, None)`."""
    slots = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable):
            continue
        path = tuple(path)
        if path[0] in ("encoder_layers", "decoder_layers"):
            for layer in range(node.get_value().shape[0]):
                slots[(path[0], layer, *path[1:])] = (node, layer)
        else:
            slots[path] = (node, None)
    return slots


def _slot_value(slot: tuple[nnx.Variable, int | None]) -> np.ndarray:
    variable, layer = slot
    value = np.asarray(variable.get_value())
    return value if layer is None else value[layer]


def _path_name(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key[len("model."):] if key.startswith("model.") else key: value
            for key, value in state_dict.items()}


def load_official_state_dict(state_dict, model_config, *, source: str = "state dict"
                             ) -> ScFoundation:
    """Our model with every variable taken from an official state dict.

    `state_dict`: a path to an `.npz`, or a mapping of official key (with or without the `model.`
    prefix) -> array. `model_config` (a `ScFoundationConfig` or `config.model`) must describe the
    same architecture.
    """
    model_config = ScFoundationConfig.from_config(model_config)
    if isinstance(state_dict, (str, Path)):
        source = str(state_dict)
        with np.load(state_dict) as npz:
            state_dict = {key: npz[key] for key in npz.files}
    arrays = {key: np.asarray(value) for key, value in _strip_prefix(state_dict).items()}
    model = nnx.eval_shape(lambda: ScFoundation(model_config, rngs=nnx.Rngs(0)))
    slots = _slots(model)
    values: dict[int, np.ndarray] = {}  # id(variable) -> its new value, filled slot by slot
    consumed, filled, problems = set(IGNORED_KEYS), set(), []
    for torch_keys, paths, to_ours, _ in _rules(model_config):
        missing = [key for key in torch_keys if key not in arrays]
        if missing:
            problems.append(f"missing in {source}: {', '.join(missing)}")
            continue
        converted = to_ours([arrays[key] for key in torch_keys])
        for index, (path, value) in enumerate(zip(paths, converted)):
            # one-to-one rules name the very tensor; fused ones (q/k/v) their group
            name = torch_keys[index] if len(torch_keys) == len(paths) else ", ".join(torch_keys)
            slot = slots.get(path)
            if slot is None:
                problems.append(f"{name} -> {_path_name(path)}: the model has no such variable "
                                "(config/architecture mismatch)")
                continue
            variable, layer = slot
            target = variable.get_value()
            shape = tuple(target.shape) if layer is None else tuple(target.shape[1:])
            if tuple(value.shape) != shape:
                problems.append(f"{name}: shape {value.shape} does not fit {_path_name(path)} "
                                f"{shape}")
                continue
            if layer is None:
                values[id(variable)] = np.asarray(value)
            else:
                values.setdefault(id(variable), np.zeros(target.shape, target.dtype))[layer] = value
            filled.add(path)
        consumed.update(torch_keys)
    unconsumed = sorted(set(arrays) - consumed)
    unfilled = sorted(_path_name(path) for path in set(slots) - filled)
    if unconsumed:
        problems.append(f"tensors of {source} not used by the model: {', '.join(unconsumed)}")
    if unfilled:
        problems.append(f"model variables not filled: {', '.join(unfilled)}")
    if problems:
        raise CheckpointError("cannot load the scFoundation weights:\n  " + "\n  ".join(problems))
    for variable in {id(variable): variable for variable, _ in slots.values()}.values():
        variable.set_value(jax.numpy.asarray(values[id(variable)],
                                             dtype=variable.get_value().dtype))
    return model


def export_official_state_dict(model: ScFoundation) -> dict[str, np.ndarray]:
    """Our model's variables under the official MaeAutobin names (no `model.` prefix)."""
    slots = _slots(model)
    out: dict[str, np.ndarray] = {}
    for torch_keys, paths, _, to_official in _rules(model.cfg):
        converted = to_official([_slot_value(slots[path]) for path in paths])
        out.update(zip(torch_keys, converted))
    out["decoder.performer.calls_since_last_redraw"] = np.zeros((), np.int64)
    return out


def model_config_from_official(official_config: Mapping, state_dict: Mapping[str, np.ndarray]
                               ) -> ml_collections.ConfigDict:
    """Our `config.model` for an official checkpoint's config (and its tensor shapes).

    Flattened as `load.convertconfig`: `model_config[model]`, then `dataset_config.rnaseq`.
    """
    model_type = official_config.get("model")
    if model_type != "mae_autobin":
        raise CheckpointError(f"only scFoundation 'mae_autobin' checkpoints are supported, this one is "
                              f"{model_type!r}")
    flat = dict(official_config["model_config"][model_type])
    flat.update(official_config.get("dataset_config", {}).get("rnaseq", {}))
    arrays = _strip_prefix(state_dict)
    enc, dec = flat["encoder"], flat["decoder"]
    if enc.get("module_type") != "transformer" or dec.get("module_type") != "performer":
        raise CheckpointError(f"expected a transformer encoder and a performer decoder, got "
                              f"{enc.get('module_type')!r} / {dec.get('module_type')!r}")
    encoder = EncoderConfig(
        width=int(enc["hidden_dim"]), depth=int(enc["depth"]), heads=int(enc["heads"]),
        mlp_dim=int(arrays[_ENCODER.format(0) + "linear1.weight"].shape[0]), dropout=0.0)
    decoder = DecoderConfig(
        width=int(dec["hidden_dim"]), depth=int(dec["depth"]), heads=int(dec["heads"]),
        head_dim=int(dec["dim_head"]),
        mlp_dim=int(arrays[_DECODER.format(0) + "1.fn.fn.w1.weight"].shape[0]),
        attention="performer",
        num_features=int(arrays[_DECODER.format(0) + "0.fn.fast_attention.projection_matrix"]
                         .shape[0]))
    config = ScFoundationConfig(
        num_genes=int(flat["seq_len"]) - 2, encoder=encoder, decoder=decoder,
        bin_num=int(flat["bin_num"]), bin_alpha=float(flat["bin_alpha"]),
        mask_value=float(flat["mask_token_id"]), pad_value=float(flat["pad_token_id"]))
    config.validate()
    return ml_collections.ConfigDict(config.to_dict())


def read_official_checkpoint(path, key: str = "cell") -> tuple[dict, dict[str, np.ndarray]]:
    """(official config, state dict as numpy) of one weight set of an official `.ckpt`."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpoint(f"{path}: no such checkpoint file")
    checkpoint = torch_checkpoint.load(path)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    if "state_dict" not in checkpoint:
        if key not in checkpoint:
            raise UnknownCheckpointKey(f"{path} has no weight set {key!r}; it holds "
                                       f"{', '.join(map(repr, checkpoint))} (official: {CHECKPOINT_KEYS})")
        checkpoint = checkpoint[key]
    if "config" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}[{key!r}] lacks 'config' or 'state_dict'; not an official "
                              "scFoundation checkpoint")
    state_dict = {name: np.asarray(array, np.float32) if torch_checkpoint.is_floating_point(array)
                  else array for name, array in checkpoint["state_dict"].items()}
    return checkpoint["config"], state_dict


def load_official_checkpoint(path, key: str = "cell"
                             ) -> tuple[ml_collections.ConfigDict, ScFoundation]:
    """(model config, model) from one weight set (`gene`, `cell` or `rde`) of `models.ckpt`."""
    official_config, state_dict = read_official_checkpoint(path, key)
    model_config = model_config_from_official(official_config, state_dict)
    model = load_official_state_dict(state_dict, model_config, source=f"{path}[{key!r}]")
    return model_config, model


def save_official_checkpoint(model: ScFoundation, path, official_config: Mapping,
                             keys: tuple[str, ...] = CHECKPOINT_KEYS) -> None:
    """Writes `model` as a released-format `models.ckpt` (the same weights under every key of
    `keys`, each with `official_config` and the `model.`-prefixed state dict)."""
    state_dict = {f"model.{name}": array for name, array in
                  export_official_state_dict(model).items()}
    torch_checkpoint.save({key: {"config": dict(official_config), "state_dict": state_dict}
                           for key in keys}, path)
