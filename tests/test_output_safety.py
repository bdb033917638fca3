"""One home for "nothing of the user's overwritten or half-written": every command that writes an
output file or folder refuses through `scfm_jax.output_safety` (before any model loads, so these
tests compile nothing), and every output is written under a temporary name and moved into place."""
import ast
import errno
import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_jax import output_safety
from scfm_jax.errors import OutputError
from scfm_jax.main import main as scfm_main

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "scfm_jax"
CONFIG = REPO / "configs" / "scfoundation_tiny.py"

# command -> (its argv with CELLS, STORE, OUT standing for the paths, whether it writes a folder,
# whether it has --overwrite). The checkpoints do not exist: the refusal comes before any load.
COMMANDS = {
    "embed": (["embed", "--checkpoint", "c.ckpt", "--input", "CELLS", "--output", "OUT"], False,
              True),
    "annotate": (["annotate", "--checkpoint", "c.pt", "--input", "CELLS", "--output", "OUT"],
                 False, True),
    "embed --store": (["embed", "--checkpoint", "c.ckpt", "--store", "STORE", "--output", "OUT"],
                      True, True),
    "annotate --store": (["annotate", "--checkpoint", "c.pt", "--store", "STORE", "--output",
                          "OUT"], True, True),
    "perturb": (["perturb", "--input", "CELLS", "--output", "OUT", "--quiet"], True, True),
    "genes": (["genes", "--checkpoint", "c.ckpt", "--input", "CELLS", "--output", "OUT",
               "--quiet"], True, True),
    "evaluate": (["evaluate", "--input", "CELLS", "--label-key", "condition", "--batch-key",
                  "condition", "--output", "OUT", "--quiet"], True, True),
    "convert": (["convert", "CELLS", "--output", "OUT", "--vocabulary", "from-data",
                 "--no-progress"], True, True),
    "train": (["train", "--config", str(CONFIG), "--workdir", "OUT", "--config.data.store=STORE"],
              True, False),
}


def perturbation_cells(path: Path) -> Path:
    """A tiny perturbation screen: 20 genes, controls, 8 single and 2 double perturbations."""
    rng = np.random.default_rng(0)
    conditions = ["control"] * 30 + [c for c in ["G0", "G1", "G2", "G3", "G4", "G5", "G6", "G7",
                                                 "G0+G1", "G2+G3"] for _ in range(8)]
    adata = anndata.AnnData(
        sp.csr_matrix(rng.poisson(3, (len(conditions), 20)).astype(np.float32)),
        obs=pd.DataFrame({"condition": conditions},
                         index=[f"c{i}" for i in range(len(conditions))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(20)]))
    adata.write_h5ad(path)
    return path


@pytest.fixture
def places(tmp_path):
    cells = perturbation_cells(tmp_path / "cells.h5ad")
    store = tmp_path / "store"
    store.mkdir()
    return tmp_path, cells, store


@pytest.fixture
def checked(monkeypatch):
    """The outputs `output_safety.check_output` was asked about (a spy on its place check)."""
    seen, place = [], output_safety._check_place

    def spy(output, inputs, flag):
        seen.append(Path(output).absolute())
        return place(output, inputs, flag)

    monkeypatch.setattr(output_safety, "_check_place", spy)
    return seen


def run(capsys, command: str, cells, store, output, *extra):
    argv, _, _ = COMMANDS[command]
    names = {"CELLS": str(cells), "STORE": str(store), "OUT": str(output)}
    argv = [names.get(word, word).replace("STORE", str(store)) for word in argv]
    status = scfm_main(argv + list(extra))
    return status, capsys.readouterr().err.strip().splitlines()


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def output_name(command: str) -> str:
    return "out.h5ad" if not COMMANDS[command][1] else "out"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_of_other_files_is_refused_in_one_line_and_kept(command, places, checked, capsys):
    tmp_path, cells, store = places
    output = tmp_path / output_name(command)
    output.mkdir()
    (output / "notes.txt").write_text("my notes")
    before = files_of(tmp_path)
    for flags in ([], ["--overwrite"]) if COMMANDS[command][2] else ([],):
        status, err = run(capsys, command, cells, store, output, *flags)
        assert status == 1 and len(err) == 1, err
        name = command.split()[0]
        assert err[0].startswith(f"scfm-jax {name}: error: --") and "nothing was changed" in err[0]
        assert f"scfm-jax {name} did not write (e.g. 'notes.txt')" in err[0], err
        assert checked[-1] == output.absolute()
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_not_written_by_the_command_is_kept(command, places, checked, capsys):
    tmp_path, cells, store = places
    output = tmp_path / output_name(command)
    output.write_text("the user's")
    status, err = run(capsys, command, cells, store, output)
    assert status == 1 and len(err) == 1, err
    name, (_, writes_folder, has_overwrite) = command.split()[0], COMMANDS[command]
    if has_overwrite and not command.endswith("--store") and command != "convert":
        assert f"was not written by scfm-jax {name}; nothing was changed. Pass --overwrite" in err[0]
    else:   # written in place, resumable: a file there is never replaced
        assert "is a file, not a folder; nothing was changed" in err[0], err
    assert checked[-1] == output.absolute() and output.read_text() == "the user's"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_the_input_is_never_the_output(command, places, checked, capsys):
    tmp_path, cells, store = places
    source = store if command.endswith("--store") else cells
    before = files_of(tmp_path)
    for flags in ([], ["--overwrite"]):
        status, err = run(capsys, command, cells, store, source, *flags)
        assert status == 1 and len(err) == 1 and "is the input" in err[0], err
    assert files_of(tmp_path) == before


def test_a_crash_mid_write_leaves_the_previous_output_and_no_scratch(tmp_path, capsys,
                                                                     monkeypatch):
    """perturb (baselines only, seconds) killed by a full disk while writing its plot: the previous
    output stays as it was and nothing half-written is left; the next run replaces the previous
    output (its own) without --overwrite."""
    from scfm_jax.tasks import perturbation_plots

    cells = perturbation_cells(tmp_path / "cells.h5ad")
    output = tmp_path / "perturbed"
    with output_safety.staged_folder(output, command="perturb") as folder:
        (folder / "metrics.csv").write_text("previous")
    before = files_of(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(perturbation_plots, "plot_results", disk_full)
    argv = ["perturb", "--input", str(cells), "--output", str(output), "--predictors",
            "no_change,train_mean", "--quiet"]
    assert scfm_main(argv) == 1
    assert "no space left on the device" in capsys.readouterr().err.strip().splitlines()[-1]
    assert files_of(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "cells.h5ad", "perturbed"]
    monkeypatch.undo()
    assert scfm_main(argv) == 0
    assert sorted(p.name for p in output.iterdir()) == [
        ".scfm_jax.json", "metrics.csv", "perturbation.png", "predictions.h5ad", "split.json"]
    assert json.loads((output / ".scfm_jax.json").read_text())["command"] == "perturb"


def test_staged_outputs_are_whole_or_absent(tmp_path):
    """A file or folder written under `staged_output` / `staged_folder` appears only complete; a
    failure inside leaves what was there; a folder records the files it wrote, so a file the user
    adds to it later makes it theirs (never replaced, not even with --overwrite)."""
    target = tmp_path / "a.h5ad"
    target.write_text("old")
    with pytest.raises(RuntimeError), output_safety.staged_output(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]
    with output_safety.staged_output(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]

    folder = tmp_path / "genes"
    with output_safety.staged_folder(folder, command="genes") as scratch:
        (scratch / "sub").mkdir()
        (scratch / "sub" / "table.csv").write_text("1")
    output_safety.check_output(folder, command="genes", folder=True)   # its own: replaceable
    with pytest.raises(OutputError, match="scfm-jax evaluate did not write"):
        output_safety.check_output(folder, command="evaluate", folder=True, overwrite=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"holding 1 files .* \(e.g. 'notes.txt'\)"):
        output_safety.check_output(folder, command="genes", folder=True, overwrite=True)
    output_safety.check_output(tmp_path / "empty", command="genes", folder=True)
    (tmp_path / "empty").mkdir()
    output_safety.check_output(tmp_path / "empty", command="genes", folder=True)


# Modules that rename or stage files for something other than a command's output: the training
# run's own bookkeeping inside its locked workdir, a cell store's shards (written in place and
# resumable, checked by `check_output` as a whole), and download / conversion caches.
OWN_RENAMES = {"output_safety.py", "train/workdir.py", "data/convert.py", "data/readers.py",
               "data/vocabulary.py"}
RENAMING = {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("tempfile", "mkdtemp")}


def test_outputs_are_staged_and_renamed_only_in_output_safety():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and (node.func.value.id, node.func.attr) in RENAMING
                    and name not in OWN_RENAMES):
                found.append(f"{name}:{node.lineno}")
    assert found == [], "write outputs through scfm_jax.output_safety (staged_output)"
