"""The experiment-config command line of `train` and `plan`, and the checks of a config's values
before anything is compiled or written: one clear line each.

`parse_command` parses a command's argparse flags plus `--config FILE[:ARG]` (a Python file with
`get_config()`, loaded here) and any number of `--config.a.b=VALUE` overrides, each set through
ml_collections' `ConfigDict`, which checks the type; a syntax error in the file, a misspelt field
or a value of the wrong type is one line. `check` validates the values that would otherwise fail
deep inside the pipeline or after compilation (batch, buckets, mesh, learning rate, steps, paths).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import math
import traceback
from pathlib import Path

from scfm_jax.errors import UsageError
from scfm_jax.output_safety import check_output
from scfm_jax.train import workdir as workdir_lib

OVERRIDE_PREFIX = "--config."
OVERRIDES_HELP = ("--config.FIELD=VALUE overrides any field of the config file, e.g. "
                  "--config.train.steps=1000 --config.data.buckets='(128,256)'")


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with `parser` plus `--config FILE[:ARG]` and its `--config.a.b=VALUE`
    overrides; `args.config` is the loaded config with the overrides set, locked."""
    parser.add_argument("--config", required=True, metavar="FILE[:ARG]",
                        help="experiment config (a Python file with get_config([ARG])), e.g. "
                             "configs/scfoundation_tiny.py. " + OVERRIDES_HELP)
    overrides, rest = split_overrides(argv)
    args = parser.parse_args(rest)
    config = load_config(args.config)
    for field, value in overrides:
        set_field(config, field, value)
    config.lock()
    args.config = config
    return args


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """([(field, value text)] of the `--config.a.b=VALUE` / `--config.a.b VALUE` arguments, the
    other arguments)."""
    overrides, rest, position = [], [], 0
    while position < len(argv):
        argument = argv[position]
        position += 1
        if not argument.startswith(OVERRIDE_PREFIX):
            rest.append(argument)
            continue
        field, equals, value = argument[len(OVERRIDE_PREFIX):].partition("=")
        if not equals:
            if position >= len(argv):
                raise UsageError(f"{argument}: give a value ({argument}=VALUE)")
            value = argv[position]
            position += 1
        overrides.append((field, value))
    return overrides, rest


def load_config(spec: str):
    """The ConfigDict of `FILE[:ARG]`: `get_config(ARG)` (or `get_config()`) of the Python file."""
    path_text, _, argument = str(spec).partition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UsageError(f"--config {path_text}: no such file (name a config file, e.g. "
                         "configs/scfoundation_tiny.py)")
    module_spec = importlib.util.spec_from_file_location(f"scfm_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if get_config is None:
            raise UsageError(f"--config {path_text}: defines no get_config() function")
        return get_config(argument) if argument else get_config()
    except UsageError:
        raise
    except SyntaxError as error:
        raise UsageError(f"--config {path_text}: line {error.lineno}: {error.msg}; fix the "
                         "file") from None
    except Exception as error:
        frames = [f for f in traceback.extract_tb(error.__traceback__)
                  if Path(f.filename).resolve() == path.resolve()]
        where = f" line {frames[-1].lineno}" if frames else ""
        raise UsageError(f"--config {path_text}:{where}: {type(error).__name__}: {error}; fix "
                         "the file") from None


def base_config(config_file: str, name: str, argument: str = ""):
    """The config `name` (e.g. "scfoundation_tiny") of the folder of `config_file` (a config's
    `__file__`): what a config that starts from another calls. It loads the file beside it by its
    path, so a checkout's configs build on each other however they are loaded (`--config`,
    ml_collections' config_flags, `import scfm_jax.configs.x`) and whether or not the package is
    installed; an edit to the base config is seen by every config built on it."""
    path = Path(config_file).with_name(f"{name}.py")
    return load_config(f"{path}:{argument}" if argument else str(path))


def _parse_value(text: str, current):
    """The Python value of an override's text, read as the current value's type reads it."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return text   # refused by the type check
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(config, field: str, text: str) -> None:
    """Set `config.<field>` (dotted) from an override's text; a misspelt field or a value of the
    wrong type is a UsageError naming the override."""
    import ml_collections

    node, parts = config, field.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            given = OVERRIDE_PREFIX + ".".join(parts[:depth + 1])
            hint = (f"; did you mean {OVERRIDE_PREFIX}{'.'.join(parts[:depth] + close)}?"
                    if close else f" (fields there: {', '.join(known)})" if known else "")
            raise UsageError(f"{given}: the config has no field {part!r}{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise UsageError(f"{OVERRIDE_PREFIX}{field} is a group of fields; set one of them "
                         f"({', '.join(OVERRIDE_PREFIX + field + '.' + k for k in current)})")
    value = _parse_value(text, current)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as error:
        expected = type(current).__name__
        raise UsageError(f"{OVERRIDE_PREFIX}{field}={text}: expected a value of type {expected} "
                         f"({' '.join(str(error).split())})") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, field: str, value, what: str):
    if not ok:
        raise UsageError(f"--config.{field}={value!r}: {what}")


def _positive_int(config, field: str, minimum: int = 1):
    value = config
    for part in field.split("."):
        value = value[part]
    _require(_is_int(value) and value >= minimum, field, value,
             f"must be an integer >= {minimum}")


def check_store(config, store) -> None:
    """Refuse a store whose vocabulary is not the one `data.vocabulary` names ("": any)."""
    expected = config.data.get("vocabulary") or ""
    if expected and expected != store.vocabulary.name:
        raise UsageError(
            f"--config.data.vocabulary={expected!r}, but the store {config.data.store} carries "
            f"the vocabulary {store.vocabulary.name!r}; convert the data with --vocabulary "
            f"{expected}, or set --config.data.vocabulary='' to train on the store's")


def check(config, workdir) -> None:
    """Raise UsageError naming the first invalid field of `config` (or the workdir)."""
    data, train = config.data, config.train
    _require(bool(data.store), "data.store", data.store,
             "name the cell store to train on (a folder or URL written by `scfm-jax convert`)")
    if "://" not in str(data.store) and not Path(data.store).expanduser().exists():
        _require(False, "data.store", data.store, "no such folder")
    for field in ("data.global_batch_size", "data.max_nonzero", "data.block_size",
                  "data.window_blocks", "train.steps", "train.log_every", "train.eval_every",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.grad_accum_steps"):
        _positive_int(config, field)
    for field in ("data.eval_batches", "data.prefetch", "train.warmup_steps"):
        _positive_int(config, field, minimum=0)
    buckets = tuple(data.buckets)
    _require(len(buckets) > 0 and all(_is_int(b) and b > 0 for b in buckets), "data.buckets",
             buckets, "must be positive integers")
    _require(list(buckets) == sorted(set(buckets)), "data.buckets", buckets,
             "must be increasing")
    _require(buckets[-1] <= data.max_nonzero, "data.buckets", buckets,
             f"must not exceed data.max_nonzero={data.max_nonzero}")
    _require(0 <= data.eval_fraction < 1, "data.eval_fraction", data.eval_fraction,
             "must be in [0, 1)")
    lr = train.learning_rate
    _require(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
             "train.learning_rate", lr, "must be a positive number")
    for field in ("adam_b1", "adam_b2"):
        _require(0 <= train[field] < 1, f"train.{field}", train[field], "must be in [0, 1)")
    for field in ("weight_decay", "grad_clip_norm"):
        _require(train[field] >= 0, f"train.{field}", train[field], "must be >= 0")
    mesh = dict(config.mesh)
    for axis, size in mesh.items():
        _require(_is_int(size) and (size == -1 or size >= 1), f"mesh.{axis}", size,
                 "must be a positive integer or -1 (all remaining devices)")
    _require(sum(size == -1 for size in mesh.values()) <= 1, "mesh", mesh,
             "at most one axis may be -1")
    checkpoint_dir = str(train.get("checkpoint_dir") or "")
    _require("://" not in checkpoint_dir or checkpoint_dir.startswith("gs://"),
             "train.checkpoint_dir", checkpoint_dir, "must be a folder or a gs:// URL (Orbax "
             "writes checkpoints to gs:// buckets only; mount another bucket as a folder)")
    workdir_lib.check_workdir(workdir, store=data.store)
    if checkpoint_dir and "://" not in checkpoint_dir:   # checkpoints never go into the store
        check_output(checkpoint_dir, command="train", flag="--config.train.checkpoint_dir",
                     inputs=(data.store,), overwrite=None, folder=True,
                     foreign=lambda folder: [])

