"""Where the tests find `../shared` (reference fixtures, vocabularies): import from here.

`SCFM_SHARED_DIR` may point elsewhere; otherwise `shared/` beside the repository is used. When it is
absent (a user's fresh clone) the tests that need it skip with the reason; `.ci/run` refuses to run
without it, so CI never skips them.
"""
import os
from pathlib import Path

import numpy as np
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


def plotted_pixels(png: str | Path, color: str, tolerance: float = 0.08) -> int:
    """How many pixels of a PNG are within `tolerance` of a matplotlib colour ('C0', '#1f77b4'):
    a plotted line or marker of that colour leaves hundreds, an empty axis none."""
    import matplotlib.colors
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    target = np.array(matplotlib.colors.to_rgb(color))
    return int((np.abs(image - target).max(axis=-1) < tolerance).sum())
