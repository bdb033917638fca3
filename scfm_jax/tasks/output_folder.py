"""Task outputs go to a folder written whole or not at all, never over someone else's files."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from scfm_jax.errors import UsageError


def check_output(folder, marker: str, overwrite: bool = False) -> Path:
    """Refuse a non-empty `folder` that a previous run of the same command (it holds `marker`)
    did not write, unless `overwrite`: checked before any work is done."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise UsageError(f"--output {folder} is a file; name a folder")
        if any(folder.iterdir()) and not (folder / marker).is_file() and not overwrite:
            raise UsageError(f"--output {folder} holds files this command did not write; choose "
                             "another folder or pass --overwrite to replace it")
    return folder


@contextlib.contextmanager
def staged_output(folder):
    """Yield a scratch folder beside `folder`; when the block succeeds, it replaces `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield scratch
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
            os.replace(folder, old / folder.name)
            os.replace(scratch, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

