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

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK = ".lock"
# Fields that may change between a run and its resume: they do not change the parameters.
RESUMABLE_MODEL_FIELDS = ("model.remat_policy", "model.decoder.chunk_size")

_held: dict[Path, int] = {}   # workdir -> file descriptor of the lock this process holds


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir."""


class ResumeMismatch(ValueError):
    """The config does not match the checkpoint the workdir would resume from."""


def acquire(workdir: str | Path) -> None:
    """Create the workdir and take its lock (a no-op if this process holds it already)."""
    workdir = Path(workdir).absolute()
    if workdir in _held:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise WorkdirBusy(
            f"{workdir} is in use by another training run (PID {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it to "
            "finish, stop it, or choose another --workdir") from None
    previous = _read(fd)
    if previous.get("pid"):
        print(f"scfm-jax train: {workdir}: the previous run (PID {previous['pid']} on "
              f"{previous.get('host', '?')}) ended without releasing the workdir (killed?); "
              "resuming from its last checkpoint", file=sys.stderr)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _held[workdir] = fd


def release(workdir: str | Path) -> None:
    """Empty the lock file and drop the lock (if this process holds it)."""
    fd = _held.pop(Path(workdir).absolute(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


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
