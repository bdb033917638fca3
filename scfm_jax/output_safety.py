"""Nothing of the user's overwritten, deleted or half-written: the one home of the rule that every
command writing an output follows (embed, annotate, perturb, genes, evaluate, convert, train's
workdir, the resumable `--store` outputs).

- `check_output(output, command=..., inputs=..., overwrite=...)` runs before any compute (before a
  model loads). It refuses (`OutputError`, one line, nothing changed) an output that is one of the
  inputs, inside one or holding one, whose parent is a file, a file where a folder is to be
  written, or that exists and is not a previous output of the same command, unless `--overwrite`;
  even with `--overwrite` a folder holding files the command did not write is never deleted.
  Outputs are recognised by a record of the command that wrote them (`owner_record`, kept in an
  h5ad's `uns["scfm_jax"]`, a zarr's attributes, or a folder's `.scfm_jax.json` with the files it
  wrote), or by the command's own `foreign(output)` (a store's keys, a workdir's entries).
- `staged_output(output)` / `staged_folder(output, command=...)` yield a temporary path beside the
  output to write it under; when the block ends without error it is moved into place (`publish`,
  the one rename that replaces a previous output), else removed: a reader never sees a
  half-written output.
- `FolderLock` holds an exclusive `flock` on `<folder>/.lock` for a run (its PID, host and start
  time inside), so a second run on the same folder (a training workdir, a store being converted) is
  refused naming the PID that holds it. The kernel drops the lock when a process dies: a killed
  run's lock is taken over, and said so.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

from scfm_jax import __version__
from scfm_jax.errors import OutputError, ScfmError

OWNER_KEY = "scfm_jax"     # uns key (h5ad) / attribute (zarr) naming the command that wrote it
FOLDER_RECORD = ".scfm_jax.json"   # a folder output's record: the command and the files it wrote
LOCK = ".lock"
# What `--overwrite` does, for the help of every command that has it (see `check_output`).
OVERWRITE_HELP = ("replace an --output file that this command did not write (its own previous "
                  "output is replaced without it; never an input, never a folder of other files)")
OVERWRITE_FOLDER_HELP = ("replace a file standing where the --output folder goes (its own previous "
                         "output is replaced without it; never an input, never a folder of other "
                         "files)")


def owner_record(command: str) -> dict:
    """What an output carries to say which command wrote it (`check_output` reads it back)."""
    return {"command": command, "version": __version__}


def _folder_record(path: Path) -> dict | None:
    try:
        return json.loads((path / FOLDER_RECORD).read_text())
    except (OSError, ValueError):
        return None


def written_by(path: Path) -> str | None:
    """The command recorded in an h5ad file, zarr folder or folder output that scfm-jax wrote."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix == ".h5ad":
            import h5py
            with h5py.File(path, "r") as f:
                record = f.get(f"uns/{OWNER_KEY}/command")
                value = record[()] if record is not None else None
                return value.decode() if isinstance(value, bytes) else value
        if path.is_dir() and (path / "zarr.json").is_file():
            attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
            return (attributes.get(OWNER_KEY) or {}).get("command")
    except (OSError, ValueError):
        return None
    return (_folder_record(path) or {}).get("command") if path.is_dir() else None


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def not_written_by(folder: Path, command: str) -> list[str]:
    """The files in an existing folder that `command` did not write (all of them, unless the folder
    is its output: a zarr it wrote, or a folder whose record lists what it wrote)."""
    files = _files(folder)
    if written_by(folder) != command:
        return files
    record = _folder_record(folder)
    if record is None:    # a zarr written whole by the command
        return []
    return [f for f in files if f not in set(record.get("files", ())) | {FOLDER_RECORD}]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _check_place(output: Path, inputs, flag: str) -> None:
    """Refuse an output that is an input, lies inside one or holds one, or sits under a file."""
    for source in inputs:
        if source is None or "://" in str(source):
            continue
        source = Path(source).expanduser()
        if _same(source, output):
            raise OutputError(f"{flag} {output} is the input {source}; writing it would replace "
                              f"the input. Choose another {flag}")
        resolved_output, resolved_source = output.resolve(), source.resolve()
        if resolved_source in resolved_output.parents:
            raise OutputError(f"{flag} {output} is inside the input {source}; choose an {flag} "
                              "outside the inputs")
        if resolved_output in resolved_source.parents:
            raise OutputError(f"{flag} {output} contains the input {source}; choose an {flag} "
                              "outside the inputs")
    for parent in output.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{flag} {output}: {parent} is a file, not a folder; choose an "
                              f"{flag} in a folder")


def check_output(output, *, command: str, inputs=(), overwrite: bool | None = False,
                 folder: bool = False, foreign: Callable[[object], list[str]] | None = None,
                 flag: str = "--output") -> None:
    """Refuse an output that would lose something of the user's (see the module docstring).

    `overwrite`: whether `--overwrite` was given (it lets a file that is not ours be replaced);
    None where the command writes in place and replaces nothing (train's workdir, a store).
    `folder`: the command writes a folder (an existing empty folder is taken).
    `foreign(output)` lists what in an existing folder or object-store prefix the command did not
    write (default: `not_written_by`); with it, `output` may be a URL (gs://, s3://), whose place
    is not checked."""
    remote = "://" in str(output)
    if not remote:
        output = Path(output).expanduser()
        _check_place(output, inputs, flag)
        if not output.exists() and not output.is_symlink():
            return
    held = []
    if remote or output.is_dir():
        held = (foreign or (lambda folder: not_written_by(folder, command)))(output)
    if held:
        raise OutputError(
            f"{flag} {output} is a folder holding {len(held)} files that scfm-jax {command} did "
            f"not write (e.g. {held[0]!r}); nothing was changed. Choose a new {flag}"
            + (f" (--overwrite never deletes files that scfm-jax {command} did not write)"
               if overwrite is False else ""))
    if remote or overwrite:
        return
    if output.is_dir():
        if folder or written_by(output) == command:
            return
        raise OutputError(f"{flag} {output} exists (an empty folder); pass --overwrite to replace "
                          f"it, or choose a new {flag}")
    if overwrite is None:
        raise OutputError(f"{flag} {output} is a file, not a folder; nothing was changed. Choose "
                          f"a new {flag}")
    if folder or written_by(output) != command:
        raise OutputError(f"{flag} {output} exists and was not written by scfm-jax {command}; "
                          f"nothing was changed. Pass --overwrite to replace it, or choose a new "
                          f"{flag}")


def temporary_path(output) -> Path:
    """A path next to `output` (same file system) to write it under until `publish`."""
    output = Path(output).expanduser()
    output.absolute().parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output.absolute().parent,
                                 prefix=f".{output.name}.")) / output.name


def publish(temporary, output) -> None:
    """Move the finished `temporary` (from `temporary_path`) into place as `output`; a previous
    output (checked by `check_output`) is replaced, its scratch folder removed."""
    temporary, output = Path(temporary), Path(output).expanduser()
    try:
        if (output.is_dir() or temporary.is_dir()) and output.exists() and not output.is_symlink():
            os.replace(output, temporary.parent / f"{output.name}.previous")
        os.replace(temporary, output)
    finally:
        discard(temporary)


def discard(temporary) -> None:
    """Remove the scratch folder of an output that was not published (a failed run)."""
    shutil.rmtree(Path(temporary).parent, ignore_errors=True)


@contextlib.contextmanager
def staged_output(output):
    """Yield a temporary path beside `output` to write a file or zarr folder to; it replaces
    `output` when the block ends without error, else it is removed."""
    temporary = temporary_path(output)
    try:
        yield temporary
        publish(temporary, output)
    finally:
        discard(temporary)


@contextlib.contextmanager
def staged_folder(output, *, command: str):
    """`staged_output` for a folder of files: yields the (created) temporary folder and records
    the command and the files it wrote (`FOLDER_RECORD`) before moving it into place."""
    with staged_output(output) as temporary:
        temporary.mkdir()
        yield temporary
        record = dict(owner_record(command), files=_files(temporary))
        (temporary / FOLDER_RECORD).write_text(json.dumps(record, indent=1) + "\n")


class FolderBusy(ScfmError, RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on `<folder>/.lock` held by this process (see the module docstring)."""

    _held: dict[Path, int] = {}   # folder -> file descriptor of the locks this process holds

    def __init__(self, folder, *, command: str, busy: type[ScfmError] = FolderBusy,
                 what: str = "folder", advice: str = "wait for it to finish or stop it"):
        self.folder = Path(folder).absolute()
        self.command, self.busy, self.what, self.advice = command, busy, what, advice

    @property
    def held(self) -> bool:
        return self.folder in self._held

    def acquire(self) -> None:
        """Create the folder and take its lock (a no-op if this process holds it already)."""
        if self.held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise self.busy(
                f"{self.folder} is in use by another {self.what} (PID {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, started {holder.get('started', '?')}); "
                f"{self.advice}") from None
        previous = _read(fd)
        if previous.get("pid"):
            print(f"scfm-jax {self.command}: {self.folder}: the previous run (PID "
                  f"{previous['pid']} on {previous.get('host', '?')}) ended without releasing it "
                  "(killed?); taking it over", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._held[self.folder] = fd

    def release(self) -> None:
        """Empty the lock file and drop the lock (if this process holds it)."""
        fd = self._held.pop(self.folder, None)
        if fd is not None:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
