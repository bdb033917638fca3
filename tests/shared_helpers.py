"""Where the tests find `../shared` (reference fixtures, vocabularies): import from here.

`SCFM_SHARED_DIR` may point elsewhere; otherwise `shared/` beside the repository is used. When it is
absent (a user's fresh clone) the tests that need it skip with the reason; `.ci/run` refuses to run
without it, so CI never skips them.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """The shared folder (fixtures/, data/), or None when this checkout has none."""
    configured = os.environ.get("SCFM_SHARED_DIR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared"
    return path if path.is_dir() else None


def shared_path(*parts: str) -> Path:
    """A path under the shared folder; skips the calling test when it is not there."""
    root = shared_dir()
    if root is None:
        pytest.skip("../shared (reference fixtures and vocabularies) is absent; "
                    "set SCFM_SHARED_DIR to run the fidelity tests")
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent from the shared folder")
    return path
