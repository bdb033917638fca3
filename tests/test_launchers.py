"""The launchers run end to end: a TPU pod of local workers behind a fake `gcloud`, a SLURM
allocation behind fake `sbatch`/`srun`, a GPU host without a GPU (tests/fakes/), and the notebook's
install cell. Every multi-process run is compared with one process on the same number of devices."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import nbformat
import numpy as np
import pytest

from shared_helpers import REPO_ROOT
from scfm_jax.train import loop, partitioning
from scfm_jax.train.checkpointing import Checkpoints
from scfm_jax.train.metrics import read_metrics
from scfm_jax.train.trainer import Trainer
from scfm_jax.objectives import get_objective
from test_train import _open, _overrides
from train_helpers import make_store, tiny_config

STEPS = 8  # checkpoints at 3, 6 and 8; the preemption tests interrupt after the first
FAKES = REPO_ROOT / "tests" / "fakes"
TRAIN = [sys.executable, "-m", "scfm_jax.main", "train"]


def _config(store):
    config = tiny_config(store, steps=STEPS)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return config


def _losses(workdir):
    return {step: record["train/loss"] for step, record in read_metrics(workdir).items()
            if "train/loss" in record}


def _logged_steps(workdir) -> list[int]:
    """Every train record's step in order, repeats included (a restarted run logs step 1 again)."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [record["step"] for record in map(json.loads, lines) if "train/loss" in record]


def _run(command, env, timeout=900, cleanup=None, cwd=REPO_ROOT):
    """Run a launcher in its own session; on a timeout kill its process group (and `cleanup`'s)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        for pgid in cleanup() if cleanup else ():
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = process.communicate()
        pytest.fail(f"{command[:2]} ran past {timeout} s:\n{output[-5000:]}")
    return process.returncode, output


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,  # gpu_host.sh's Python
               PATH=f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    env.update({key: str(value) for key, value in extra.items()})
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("launch_store"))


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """One process with 4 CPU devices: what 2 workers x 2 devices must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(TRAIN + ["--config", "configs/scfoundation_tiny.py", "--workdir", str(workdir),
                            "--num-cpu-devices", "4"] + _overrides(_config(store)),
                   cwd=REPO_ROOT, env=_env(), check=True, capture_output=True, timeout=900)
    return workdir


def _assert_same_run(workdir, reference, store):
    """The same losses at every step, and the same parameters in the last checkpoint."""
    losses, expected = _losses(workdir), _losses(reference)
    assert sorted(losses) == sorted(expected) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in expected], list(expected.values()), rtol=1e-5)
    resolved = loop.resolve_config(_config(store), _open(store))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    abstract = Trainer(resolved, get_objective("scfoundation"), mesh).abstract_sharded_state()
    restored = Checkpoints(workdir, read_only=True).restore_state(abstract)
    wanted = Checkpoints(reference, read_only=True).restore_state(abstract)
    assert int(restored.step) == STEPS
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(wanted.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _pod_env(root, **extra):
    return _env(**{"FAKE_GCLOUD_ROOT": root, "FAKE_TPU_PYTHON": sys.executable, "TPU_NAME": "sim",
                   "ZONE": "local-a", "ACCELERATOR": "v4-16", "JAX_PACKAGE": "jax",
                   **extra})  # v4-16: 2 workers; plain jax: this machine has no TPU


def _worker_groups(root):
    return lambda: [int(pgid) for path in Path(root).rglob("running.pgids")
                    for pgid in path.read_text().split()]


def _calls(root):
    return [json.loads(line) for line in (Path(root) / "calls.jsonl").read_text().splitlines()]


def _launch_pod(store, workdir, root, **extra):
    command = ["bash", "launch/tpu_pod.sh", "configs/scfoundation_tiny.py", str(workdir),
               *_overrides(_config(store))]
    returncode, output = _run(command, _pod_env(root, **extra), cleanup=_worker_groups(root))
    assert returncode == 0, output[-5000:]
    return output


@pytest.mark.slow
def test_tpu_pod_launcher_installs_this_checkout_and_trains_on_two_workers(
        store, reference, tmp_path):
    root, workdir = tmp_path / "gcloud", tmp_path / "run"
    _launch_pod(store, workdir, root)
    _assert_same_run(workdir, reference, store)

    calls = _calls(root)
    [create] = [call for call in calls if call.get("verb") == "create"]
    assert (create["accelerator_type"], create["version"]) == ("v4-16", "tpu-ubuntu2204-base")
    [copy] = [call for call in calls if call.get("verb") == "scp"]
    assert copy["worker"] == "all" and copy["paths"][-1] == "sim:scfm-jax-run/"
    assert [Path(p).name for p in copy["paths"][1:-1]] == ["scfoundation_tiny.py", "tpu_worker.py"]
    assert copy["paths"][0].endswith("-py3-none-any.whl")
    # each worker imports the wheel installed in its own home, not this checkout
    result = subprocess.run(
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sim", "--zone=local-a", "--worker=all",
         "--command=python3 -c 'import scfm_jax; print(scfm_jax.__file__)'"],
        env=_pod_env(root), capture_output=True, text=True, timeout=120, check=True)
    for worker in (0, 1):
        [line] = [l for l in result.stdout.splitlines() if l.startswith(f"sim-w{worker}: ")]
        home = root / "local-a" / "sim" / f"worker-{worker}"
        assert Path(line.split(": ", 1)[1]).is_relative_to(home / ".local"), line


@pytest.mark.slow
def test_preempted_pod_is_recreated_and_resumes_from_its_checkpoint(store, reference, tmp_path):
    """A spot slice is preempted once after the first checkpoint; REPO= installs a git revision."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO_ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, map(os.fsdecode, files)):
        if (REPO_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_bytes((REPO_ROOT / name).read_bytes())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "snapshot"], check=True)
    revision = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()

    root, workdir = tmp_path / "gcloud", tmp_path / "run"
    output = _launch_pod(store, workdir, root, SPOT=1, REPO=f"file://{repo}@{revision}",
                         FAKE_TPU_PREEMPT_WHEN=workdir / "checkpoints" / "3", FAKE_TPU_GRACE_S=240)
    assert "was PREEMPTED during the run" in output, output[-3000:]
    _assert_same_run(workdir, reference, store)
    logged = _logged_steps(workdir)
    assert logged.count(1) == 1, logged  # resumed from a checkpoint, not started again

    verbs = [call.get("verb", call.get("event")) for call in _calls(root)]
    assert verbs.count("create") == 2 and verbs.count("preempted") == 1
    assert verbs.index("preempted") < verbs.index("delete") < len(verbs) - verbs[::-1].index("create")
    assert all(call["spot"] for call in _calls(root) if call.get("verb") == "create")
    assert not any(call.get("verb") == "scp" and any(p.endswith(".whl") for p in call["paths"])
                   for call in _calls(root))  # REPO given: nothing built here


@pytest.mark.slow
def test_slurm_job_joins_by_slurm_detection_and_time_limit_signal_checkpoints(
        store, reference, tmp_path):
    workdir = tmp_path / "run"
    command = ["sbatch", "--ntasks-per-node=2", "launch/slurm.sbatch",
               "configs/scfoundation_tiny.py", str(workdir), *_overrides(_config(store)),
               "--num-cpu-devices=2"]
    # the time limit is "300 s away" once the first checkpoint is written: --signal=TERM@300 fires
    returncode, output = _run(
        command, _env(FAKE_SLURM_TIME_LIMIT_NEAR=workdir / "checkpoints" / "3"))
    assert returncode == 75, output[-5000:]   # preempted (no scontrol here to requeue the job)
    stopped = Checkpoints(workdir, read_only=True).latest_step()
    assert 3 < stopped < STEPS, (stopped, output[-3000:])
    assert max(_logged_steps(workdir)) == stopped  # both tasks stopped at the step they saved

    returncode, output = _run(command, _env())  # submitting again resumes
    assert returncode == 0, output[-5000:]
    _assert_same_run(workdir, reference, store)
    assert _logged_steps(workdir).count(1) == 1


@pytest.mark.slow
def test_gpu_host_without_a_gpu_says_so_and_trains_on_the_cpu(store, tmp_path):
    config = tiny_config(store, steps=2)
    returncode, output = _run(["bash", "launch/gpu_host.sh", "configs/scfoundation_tiny.py",
                               str(tmp_path / "run"), *_overrides(config)], _env())
    assert returncode == 0, output[-5000:]
    assert "no GPU found" in output and "running on the CPU" in output
    assert Checkpoints(tmp_path / "run", read_only=True).latest_step() == 2


def test_gpu_host_stops_when_jax_cannot_use_the_gpus_it_finds(tmp_path):
    (tmp_path / "nvidia-smi").write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    env = _env(PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    returncode, output = _run(["bash", "launch/gpu_host.sh", "configs/scfoundation_tiny.py",
                               str(tmp_path / "run")], env, timeout=300)
    assert returncode == 1, output
    assert "lists 2 GPUs but JAX runs on 'cpu'" in output and "jax[cuda12]" in output
    assert not (tmp_path / "run").exists()


def _install_cell():
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "analyse_checkpoint.ipynb", as_version=4)
    return next(cell.source for cell in notebook.cells
                if cell.cell_type == "code" and "SCFM_JAX" in cell.source)


def _run_install_cell(monkeypatch, location, importable=False):
    import importlib.util
    import subprocess as subprocess_module

    calls = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if importable else None)
    monkeypatch.setattr(subprocess_module, "run", lambda command, **_: calls.append(command))
    source = _install_cell().replace("SCFM_JAX = None", f"SCFM_JAX = {location!r}")
    exec(compile(source, "install cell", "exec"), {})
    return calls


def test_notebook_install_cell_installs_only_from_where_the_user_points(monkeypatch, tmp_path):
    assert "SCFM_JAX = None" in _install_cell()  # nothing is installed unless the user says where
    with pytest.raises(RuntimeError, match="set SCFM_JAX in this cell to a wheel, a git URL"):
        _run_install_cell(monkeypatch, None)
    assert _run_install_cell(monkeypatch, None, importable=True) == []

    wheel = tmp_path / "scfm_jax-0.1.0-py3-none-any.whl"
    git_url = "git+https://example.org/me/scfm-jax.git@v1"
    for location, url in ((str(wheel), wheel.as_uri()), (str(REPO_ROOT), REPO_ROOT.as_uri()),
                          (git_url, git_url)):
        [command] = _run_install_cell(monkeypatch, location)
        assert command[1:] == ["-m", "pip", "install", "-q", f"scfm-jax[analysis] @ {url}"]


# ---- any subcommand: what each launcher starts on every process, recorded instead of run

def _recording_scfm_jax(tmp_path):
    """A stand-in `scfm_jax` package (put first on PYTHONPATH) whose `main` appends its arguments
    to a JSON-lines record instead of running: what a launcher starts, without a compile."""
    package = tmp_path / "recorder" / "scfm_jax"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(
        "import json, os, sys\n"
        "def main(argv=None):\n"
        "    with open(os.environ['FAKE_SCFM_RECORD'], 'a') as record:\n"
        "        record.write(json.dumps({'argv': sys.argv[1:],\n"
        "                                 'slurm_task': os.environ.get('SLURM_PROCID')}) + '\\n')\n"
        "    return 0\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main())\n")
    record = tmp_path / "started.jsonl"
    return package.parent, record


def _started(record) -> list[dict]:
    return [json.loads(line) for line in Path(record).read_text().splitlines()]


EMBED_ARGS = ["embed", "--checkpoint", "gs://bucket/run", "--store", "gs://bucket/store",
              "--output", "gs://bucket/embeddings", "--obs-filter", "cell type=T cell"]


def test_slurm_job_starts_any_subcommand_on_every_task(tmp_path):
    recorder, record = _recording_scfm_jax(tmp_path)
    env = _env(PYTHONPATH=recorder, FAKE_SCFM_RECORD=record)
    for arguments, expected in (
            (EMBED_ARGS, EMBED_ARGS),
            (["configs/scfoundation_tiny.py", "runs/x", "--config.seed=3"],
             ["train", "--config", "configs/scfoundation_tiny.py", "--workdir", "runs/x",
              "--config.seed=3"])):
        record.unlink(missing_ok=True)
        returncode, output = _run(["sbatch", "--ntasks-per-node=2", "launch/slurm.sbatch",
                                   *arguments], env, timeout=300)
        assert returncode == 0, output[-3000:]
        started = sorted(_started(record), key=lambda s: s["slurm_task"])
        assert [s["slurm_task"] for s in started] == ["0", "1"]
        assert all(s["argv"] == expected + ["--auto-distributed"] for s in started), started


def test_tpu_pod_starts_any_subcommand_on_every_worker(tmp_path):
    """The fake slice's python3 records pip installs instead of running them, and starts
    tpu_worker.py with the recording package first on its path."""
    recorder, record = _recording_scfm_jax(tmp_path)
    python = tmp_path / "worker_python3"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f"if [ \"${{1:-}} ${{2:-}}\" = '-m pip' ]; then echo \"$*\" >> {tmp_path}/pip.log; exit 0; fi\n"
        f"PYTHONPATH={recorder} FAKE_SCFM_RECORD={record} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    for name, arguments, expected in (
            ("embed", EMBED_ARGS, EMBED_ARGS),
            ("train", ["configs/scfoundation_tiny.py", "/mnt/runs/x", "--config.seed=3"],
             ["train", "--config", "scfm-jax-run/scfoundation_tiny.py", "--workdir",
              "/mnt/runs/x", "--config.seed=3"])):
        root = tmp_path / name
        env = _pod_env(root, FAKE_TPU_PYTHON=python, REPO="https://example.org/scfm-jax.git@v1")
        returncode, output = _run(["bash", "launch/tpu_pod.sh", *arguments], env, timeout=300,
                                  cleanup=_worker_groups(root))
        assert returncode == 0, output[-3000:]
        started = _started(record)
        record.unlink()
        assert len(started) == 2, started
        for worker in (0, 1):
            [argv] = [s["argv"] for s in started if f"--process-id={worker}" in s["argv"]]
            assert argv[:len(expected)] == expected
            assert argv[len(expected)].startswith("--coordinator-address=127.0.0.1:")
            assert argv[len(expected) + 1:] == ["--num-processes=2", f"--process-id={worker}"]
        [copy] = [call for call in _calls(root) if call.get("verb") == "scp"]
        assert [Path(p).name for p in copy["paths"][:-1]] == (
            ["tpu_worker.py"] if name == "embed" else ["scfoundation_tiny.py", "tpu_worker.py"])
    assert "git+https://example.org/scfm-jax.git@v1" in (tmp_path / "pip.log").read_text()


def test_gpu_host_and_local_processes_start_any_subcommand(tmp_path):
    recorder, record = _recording_scfm_jax(tmp_path)
    bin_dir = tmp_path / "bin"   # an nvidia-smi that lists no GPU, wherever the test runs
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = _env(PYTHONPATH=recorder, FAKE_SCFM_RECORD=record,
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # run from another folder: `python -m` puts the working directory first on the path
    launch = REPO_ROOT / "launch"
    returncode, output = _run(["bash", launch / "gpu_host.sh", *EMBED_ARGS], env, timeout=300,
                              cwd=tmp_path)
    assert returncode == 0 and "running on the CPU" in output, output[-3000:]
    assert [s["argv"] for s in _started(record)] == [EMBED_ARGS]
    record.unlink()
    returncode, output = _run(["bash", launch / "local_processes.sh", "2", "3", "--",
                               sys.executable, "-m", "scfm_jax.main", *EMBED_ARGS], env,
                              timeout=300, cwd=tmp_path)
    assert returncode == 0, output[-3000:]
    started = sorted(s["argv"][len(EMBED_ARGS):] for s in _started(record))
    port = started[0][0]
    assert port.startswith("--coordinator-address=127.0.0.1:")
    assert started == [[port, "--num-processes=2", f"--process-id={i}", "--num-cpu-devices=3"]
                       for i in (0, 1)]
