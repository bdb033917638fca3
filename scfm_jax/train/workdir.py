"""A training workdir's own bookkeeping: the lock, config.json and the metrics log on resume.

- The lock: process 0 holds an exclusive `flock` on `<workdir>/.lock` (which records its PID, host
  and start time) for the whole run, so a second run on the same workdir is refused with the PID
  that holds it. The kernel drops the lock when a process dies, so the lock of a killed run is
  detected as stale and taken over; the file stays, empty, once a run ends.
- config.json is written only once the config has been checked against the checkpoint a run
  resumes from (`check_resume`), so a rejected config never replaces the one of the run.
- metrics.jsonl is cut back to the restored step on resume: the steps a killed run logged after
  its last checkpoint are replayed, and the log stays one trajectory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from scfm_jax.errors import WorkdirError
from scfm_jax.output_safety import LOCK, FolderLock, check_output

# Fields that may change between a run and its resume: they do not change the parameters.
RESUMABLE_MODEL_FIELDS = ("model.remat_policy", "model.decoder.chunk_size", "model.unroll_layers")
# What a run writes into its workdir; a workdir holding anything else is not a run's.
RUN_FILES = (LOCK, "config.json", "metrics.jsonl", ".config.json.tmp", ".metrics.jsonl.tmp")
RUN_FOLDERS = ("checkpoints", "profile", "tensorboard")


class WorkdirBusy(WorkdirError):
    """Another run holds the workdir."""


class ResumeMismatch(WorkdirError, ValueError):
    """The config does not match the checkpoint the workdir would resume from."""


def _lock(workdir) -> FolderLock:
    return FolderLock(workdir, command="train", busy=WorkdirBusy, what="training run",
                      advice="wait for it to finish, stop it, or choose another --workdir")


def not_run_files(workdir: Path) -> list[str]:
    """The entries of an existing folder that a training run does not write."""
    return sorted(p.name for p in Path(workdir).iterdir()
                  if not (p.name in RUN_FILES or p.name in RUN_FOLDERS
                          or p.name.startswith("events.out.")))


def check_workdir(workdir: str | Path, store: str | Path | None = None) -> None:
    """Refuse a --workdir that is a file, sits under a file, is the training `store` or lies inside
    it, or holds files that are not a run's (`output_safety.check_output`): a run writes only its
    own files into its workdir."""
    check_output(workdir, command="train", flag="--workdir", inputs=(store,), overwrite=None,
                 folder=True, foreign=not_run_files)


def acquire(workdir: str | Path) -> None:
    """Check the workdir, create it and take its lock (a no-op if this process holds it)."""
    check_workdir(workdir)
    _lock(workdir).acquire()


def release(workdir: str | Path) -> None:
    """Empty the lock file and drop the lock (if this process holds it)."""
    _lock(workdir).release()


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(saved: dict, config: dict, workdir) -> None:
    """Refuse to resume a checkpoint of another model, objective or seed, naming the fields."""
    old, new = _flatten(saved), _flatten(config)
    fields = sorted(k for k in set(old) | set(new)
                    if k.split(".")[0] in ("model", "objective", "seed")
                    and k not in RESUMABLE_MODEL_FIELDS
                    and _comparable(old.get(k)) != _comparable(new.get(k)))
    if fields:
        shown = ", ".join(f"{k} is {old.get(k)!r} there, {new.get(k)!r} now" for k in fields[:3])
        more = f" (and {len(fields) - 3} more)" if len(fields) > 3 else ""
        raise ResumeMismatch(f"{workdir} holds checkpoints of a different run: {shown}{more}; "
                             "resume with the run's config (its config.json) or use a fresh "
                             "--workdir")


def _comparable(value):
    return list(map(_comparable, value)) if isinstance(value, (list, tuple)) else value


def write_config(workdir, config: dict) -> None:
    path = Path(workdir) / "config.json"
    temporary = path.with_name(".config.json.tmp")
    temporary.write_text(json.dumps(config, indent=2))
    os.replace(temporary, path)


def truncate_metrics(workdir, step: int) -> None:
    """Keep only the records of steps <= `step` in metrics.jsonl (and drop a torn last line)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue   # the torn last line of a killed run
        if record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    temporary = path.with_name(".metrics.jsonl.tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)
