"""Official scMulan checkpoints (`{'model_args', 'model'}` .pt files) to and from `ScMulan`.

The released `ckpt_scMulan.pt` is a `torch.save`d dict: `model_args` (the `MulanConfig` fields) and
`model` (the state dict of SPEC.md II.7). Every tensor is consumed; an unknown, missing or
misshapen key is an error naming it. Checkpoints are read and written without PyTorch
(`torch_checkpoint`); only `export_official_state_dict`, which returns torch tensors, needs it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from scfm_jax.errors import CheckpointError, MissingCheckpoint, MissingDependency
from scfm_jax.interop import torch_checkpoint
from scfm_jax.models.scmulan import ScMulan, ScMulanConfig

def _torch():
    try:
        import torch
    except ImportError as error:
        raise MissingDependency("the scMulan state dict as torch tensors needs PyTorch: "
                                "pip install torch") from error
    return torch


def model_config_from_args(model_args: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config.model` for the official `model_args` (MulanConfig fields)."""
    required = ("vocab_size", "n_layer", "n_head", "n_embd")
    missing = [k for k in required if k not in model_args]
    if missing:
        raise CheckpointError(f"model_args lacks {missing}; is this an scMulan checkpoint?")
    if model_args.get("ele", 1) != 1:
        raise CheckpointError("model_args['ele'] must be 1 (expression-level embedding), as the "
                              "released scMulan asserts")
    return ml_collections.ConfigDict(dict(
        name="scmulan", vocab_size=int(model_args["vocab_size"]),
        n_layer=int(model_args["n_layer"]), n_head=int(model_args["n_head"]),
        n_embd=int(model_args["n_embd"]),
        expression_level=int(model_args.get("expression_level", 10)),
        bias=bool(model_args.get("bias", True)),
        dtype="float32", remat_policy="none", attention="dot_product"))


def _expected_shapes(cfg: ScMulanConfig) -> dict[str, tuple[int, ...]]:
    d, v = cfg.n_embd, cfg.vocab_size
    shapes = {"transformer.wte.weight": (v, d), "transformer.wee.weight": (cfg.expression_level + 1, d),
              "transformer.ln_f.weight": (d,), "lm_head.weight": (v, d), "epx_head.weight": (v, d)}
    per_block = {"ln_1.weight": (d,), "ln_2.weight": (d,), "attn.c_attn.weight": (3 * d, d),
                 "attn.c_proj.weight": (d, d), "mlp.c_fc.weight": (4 * d, d),
                 "mlp.c_proj.weight": (d, 4 * d)}
    if cfg.bias:
        shapes["transformer.ln_f.bias"] = (d,)
        per_block.update({"ln_1.bias": (d,), "ln_2.bias": (d,), "attn.c_attn.bias": (3 * d,),
                          "attn.c_proj.bias": (d,), "mlp.c_fc.bias": (4 * d,),
                          "mlp.c_proj.bias": (d,)})
    for i in range(cfg.n_layer):
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in per_block.items()})
    return shapes


def _set(param: nnx.Param, value: np.ndarray):
    param[...] = jnp.asarray(value.reshape(param.shape), param[...].dtype)


def load_state_dict(model: ScMulan, state_dict: Mapping[str, Any], source: str = "state dict"):
    """Copies an official state dict into `model` (in place); every tensor must be consumed."""
    cfg = model.cfg
    expected = _expected_shapes(cfg)
    arrays = {k: np.asarray(v.float().numpy() if hasattr(v, "numpy") else v, np.float32)
              for k, v in state_dict.items()}
    unknown = sorted(set(arrays) - set(expected))
    missing = sorted(set(expected) - set(arrays))
    if unknown or missing:
        raise CheckpointError(f"{source} does not match an scMulan model with {cfg}: unknown keys "
                              f"{unknown[:8]}, missing keys {missing[:8]}")
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise CheckpointError(f"{source}: {key} has shape {arrays[key].shape}, expected {shape}")
    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    _set(model.wte, arrays["transformer.wte.weight"])
    _set(model.wee, arrays["transformer.wee.weight"])
    _set(model.ln_f.scale, arrays["transformer.ln_f.weight"])
    _set(model.lm_head, arrays["lm_head.weight"].T)
    _set(model.epx_head, arrays["epx_head.weight"].T)
    if cfg.bias:
        _set(model.ln_f.bias, arrays["transformer.ln_f.bias"])
    blocks = model.blocks  # stacked: every parameter has a leading layer axis

    def stacked(name, to_ours=lambda a: a):
        return np.stack([to_ours(arrays[f"transformer.h.{i}.{name}"]) for i in range(cfg.n_layer)])

    _set(blocks.ln_1.scale, stacked("ln_1.weight"))
    _set(blocks.ln_2.scale, stacked("ln_2.weight"))
    # torch Linear weights are [out, in]; c_attn's output is [q | k | v], each head-major
    _set(blocks.qkv_kernel, stacked("attn.c_attn.weight", lambda a: a.T.reshape(d, 3, h, hd)))
    _set(blocks.out_kernel, stacked("attn.c_proj.weight", lambda a: a.T.reshape(h, hd, d)))
    _set(blocks.fc_kernel, stacked("mlp.c_fc.weight", np.transpose))
    _set(blocks.proj_kernel, stacked("mlp.c_proj.weight", np.transpose))
    if cfg.bias:
        _set(blocks.ln_1.bias, stacked("ln_1.bias"))
        _set(blocks.ln_2.bias, stacked("ln_2.bias"))
        _set(blocks.qkv_bias, stacked("attn.c_attn.bias", lambda a: a.reshape(3, h, hd)))
        _set(blocks.out_bias, stacked("attn.c_proj.bias"))
        _set(blocks.fc_bias, stacked("mlp.c_fc.bias"))
        _set(blocks.proj_bias, stacked("mlp.c_proj.bias"))


def state_dict_arrays(model: ScMulan) -> dict[str, np.ndarray]:
    """The official state dict of `model` as float32 numpy arrays (torch layout)."""
    cfg = model.cfg
    d = cfg.n_embd
    a = lambda param: np.asarray(param[...], np.float32)  # noqa: E731
    out = {"transformer.wte.weight": a(model.wte), "transformer.wee.weight": a(model.wee)}
    blocks = model.blocks
    for i in range(cfg.n_layer):
        prefix = f"transformer.h.{i}."
        layer = lambda param: a(param)[i]  # noqa: E731
        out[prefix + "ln_1.weight"] = layer(blocks.ln_1.scale)
        out[prefix + "attn.c_attn.weight"] = layer(blocks.qkv_kernel).reshape(d, 3 * d).T
        out[prefix + "attn.c_proj.weight"] = layer(blocks.out_kernel).reshape(d, d).T
        out[prefix + "ln_2.weight"] = layer(blocks.ln_2.scale)
        out[prefix + "mlp.c_fc.weight"] = layer(blocks.fc_kernel).T
        out[prefix + "mlp.c_proj.weight"] = layer(blocks.proj_kernel).T
        if cfg.bias:
            out[prefix + "ln_1.bias"] = layer(blocks.ln_1.bias)
            out[prefix + "ln_2.bias"] = layer(blocks.ln_2.bias)
            out[prefix + "attn.c_attn.bias"] = layer(blocks.qkv_bias).reshape(3 * d)
            out[prefix + "attn.c_proj.bias"] = layer(blocks.out_bias)
            out[prefix + "mlp.c_fc.bias"] = layer(blocks.fc_bias)
            out[prefix + "mlp.c_proj.bias"] = layer(blocks.proj_bias)
    out["transformer.ln_f.weight"] = a(model.ln_f.scale)
    if cfg.bias:
        out["transformer.ln_f.bias"] = a(model.ln_f.bias)
    out["lm_head.weight"] = a(model.lm_head).T
    out["epx_head.weight"] = a(model.epx_head).T
    return {k: np.array(v, order="C") for k, v in out.items()}


def load_official_checkpoint(path: str | os.PathLike, *, dtype: str = "float32",
                             ) -> tuple[ml_collections.ConfigDict, ScMulan]:
    """(config.model, ScMulan with the weights) from an official `{'model_args','model'}` .pt."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingCheckpoint(f"scMulan checkpoint {path} does not exist (the released weights "
                                "are ckpt/ckpt_scMulan.pt from the scMulan repository's link)")
    checkpoint = torch_checkpoint.load(path)
    if not isinstance(checkpoint, Mapping) or not {"model_args", "model"} <= set(checkpoint):
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise CheckpointError(f"{path} is not an scMulan checkpoint: expected a dict with 'model_args' "
                              f"and 'model', found {keys}")
    model_config = model_config_from_args(checkpoint["model_args"])
    model_config.dtype = dtype
    model = nnx.eval_shape(lambda: ScMulan(model_config, rngs=nnx.Rngs(0)))
    # abstract init then zeros: no random initialisation is spent on weights about to be replaced
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))
    load_state_dict(model, checkpoint["model"], source=path)
    return model_config, model


def export_official_state_dict(model: ScMulan) -> dict[str, Any]:
    """The model's state dict as torch tensors, keyed as the original `scMulanModel`."""
    torch = _torch()
    return {k: torch.from_numpy(v) for k, v in state_dict_arrays(model).items()}


def save_official_checkpoint(model: ScMulan, path: str | os.PathLike, block_size: int = 1000):
    """Writes `{'model_args', 'model'}` as the released checkpoint (loadable by the original)."""
    cfg = model.cfg
    model_args = dict(block_size=block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias,
                      expression_level=cfg.expression_level, ele=1)
    torch_checkpoint.save({"model_args": model_args, "model": state_dict_arrays(model)}, path)
