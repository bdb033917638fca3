"""Checks of an experiment config before anything is compiled or written: one clear line each.

`parse_flags` turns absl / ml_collections parse failures (an unknown flag, a misspelt config field,
a value of the wrong type) and `--help` into one line; `check` validates the values that would
otherwise fail deep inside the pipeline or after compilation (batch, buckets, mesh, learning rate,
steps, paths).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from scfm_jax.errors import UsageError

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull")


def parse_flags(flag_values, argv: list[str], doc: str, program: str = "scfm-jax train"):
    """Parse `argv` into `flag_values`; `--help` prints the usage and exits 0."""
    from absl import flags

    if any(a in HELP_FLAGS for a in argv):
        print(f"{doc.strip()}\n\nflags:\n{flag_values.get_help()}\n  --config.FIELD=VALUE: "
              "override any field of the config file")
        raise SystemExit(0)
    try:
        flag_values([program, *argv])
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        message = str(error.args[0] if error.args else error)
        misspelt = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', message)
        if misspelt:
            good, bad = misspelt.groups()
            given = next((a.split("=")[0] for a in argv if f".{bad}" in a), bad)
            raise UsageError(f"{given}: the config has no field {bad!r}; did you mean "
                             f"{given.replace(bad, good)}?") from None
        raise UsageError(" ".join(message.replace("\\n", " ").replace("'", "").split())) from None


def parse_command(flag_values, argv: list[str], doc: str, program: str, required: tuple[str, ...],
                  example: str):
    """Define `--config` (a config file, with `--config.a.b=...` overrides), parse `argv` as
    `parse_flags` does, and exit with `example` when a `required` flag is missing."""
    from ml_collections import config_flags

    # ml_collections finds the --config.a.b=... overrides in the argv it is given (default
    # sys.argv, which is not ours when a command's `main` is called from Python).
    config_flags.DEFINE_config_file("config", None,
                                    "experiment config file (a Python file with get_config())",
                                    flag_values=flag_values, lock_config=True,
                                    sys_argv=[program, *argv])
    parse_flags(flag_values, argv, doc, program=program)
    if any(getattr(flag_values, name) is None for name in required):
        raise SystemExit(f"{program}: {' and '.join('--' + n for n in required)} are required\n"
                         f"  e.g. {example}")
    return flag_values


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
    _require(train.warmup_steps <= train.steps, "train.warmup_steps", train.warmup_steps,
             f"must not exceed train.steps={train.steps}")
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
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} is a file; name a folder for the run")

