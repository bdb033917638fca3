"""Where the tests find the reference fixtures, vocabularies and real data: import from here.

The shared folder (`shared/` beside the repository, or `$SCFM_SHARED_DIR`) holds all of it. A clone
without one (a user's) runs on the copies committed under `tests/data/`: the fixtures (this
project's own outputs of the original code on random weights) and the MIT/BSD-licensed downstream
data. What is not committed (the vocabularies, which are the original projects' files, and the
GPL-3 DoRothEA network) makes the tests that need it skip, naming it. `.ci/run` refuses to run
without the shared folder, so CI never skips them.
"""
import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMITTED_DATA = REPO_ROOT / "tests" / "data"

# Where a folder of the shared tree is copied in this repository (see tests/data/README.md).
COMMITTED_COPIES = {
    ("fixtures",): COMMITTED_DATA / "fixtures",
    ("data", "downstream"): COMMITTED_DATA / "downstream",
}
SCMULAN_VOCABULARY = "scMulan's own vocabulary (its meta_info.pt exported), not committed"
# Files of those folders deliberately left out of the copies, and why.
NOT_COMMITTED = {
    ("fixtures", "scmulan-tiny", "token_set.tsv"): SCMULAN_VOCABULARY,
    ("fixtures", "scmulan-tiny", "gene_set.txt"): SCMULAN_VOCABULARY,
    ("fixtures", "scmulan-tiny", "meta_categories.json"): SCMULAN_VOCABULARY,
    ("data", "downstream", "dorothea_hs_AB.tsv"): "DoRothEA (GPL-3), not committed",
}
SET_SHARED = "set SCFM_SHARED_DIR to a shared folder that has it"


def shared_dir() -> Path | None:
    """The shared folder (fixtures/, data/), or None when this checkout has none."""
    configured = os.environ.get("SCFM_SHARED_DIR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared"
    return path if path.is_dir() else None


def committed_copy(parts: tuple[str, ...]) -> Path | None:
    """Where `parts` of the shared tree lies under tests/data/, if that part was copied."""
    for prefix, folder in COMMITTED_COPIES.items():
        if parts[:len(prefix)] == prefix:
            return folder.joinpath(*parts[len(prefix):])
    return None


def _left_out(parts: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, reason) of the uncommitted files at or under `parts`."""
    return [("/".join(left), reason) for left, reason in NOT_COMMITTED.items()
            if left[:len(parts)] == parts]


def shared_path(*parts: str) -> Path:
    """A path of the shared tree: from the shared folder when there is one, else from the copy
    under tests/data/. Skips the calling test, naming what is missing and why, when neither has
    it whole (a folder counts only with every file the shared folder has in it)."""
    root = shared_dir()
    if root is not None and root.joinpath(*parts).exists():
        return root.joinpath(*parts)
    if not parts:
        pytest.skip("../shared (reference fixtures, vocabularies and real data) is absent; "
                    f"{SET_SHARED}")
    name = "/".join(parts)
    copy = committed_copy(parts)
    left_out = _left_out(parts) if copy is not None else []
    if left_out:
        by_reason = {}
        for left, reason in left_out:
            by_reason.setdefault(reason, []).append(left.rsplit("/", 1)[-1])
        missing = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
        pytest.skip(f"{name} needs {missing}; {SET_SHARED}")
    if copy is not None and copy.exists():
        return copy
    where = "the shared folder" if root is not None else "../shared (absent)"
    kind = ("is not committed to tests/data (vocabularies are the original projects' files; "
            "see tests/data/README.md)" if copy is None else "is absent from tests/data")
    pytest.skip(f"{name} is only in {where} and {kind}; {SET_SHARED}")


def plotted_pixels(png: str | Path, color: str, tolerance: float = 0.08) -> int:
    """How many pixels of a PNG are within `tolerance` of a matplotlib colour ('C0', '#1f77b4'):
    a plotted line or marker of that colour leaves hundreds, an empty axis none."""
    import matplotlib.colors
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    target = np.array(matplotlib.colors.to_rgb(color))
    return int((np.abs(image - target).max(axis=-1) < tolerance).sum())
