"""The train loop: meshes, sharded state, checkpoints across meshes, determinism and resume,
divergence, config overrides."""
import json
import math

import jax
import numpy as np
import pytest

from scfm_jax.train import loop, partitioning
from scfm_jax.train.checkpointing import Checkpoints
from scfm_jax.train.metrics import read_metrics
from scfm_jax.train.state import Trainer
from scfm_jax.objectives import get_objective
from train_helpers import make_store, tiny_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("train_store"))


def test_mesh_shape_fills_one_axis():
    assert partitioning.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert partitioning.mesh_shape(dict(data=1, fsdp=-1, tensor=1), 4) == (1, 4, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        partitioning.mesh_shape(dict(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="at most one axis"):
        partitioning.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)


def test_uneven_dimensions_are_replicated_not_refused():
    mesh = partitioning.make_mesh(dict(data=1, fsdp=2, tensor=4), devices=jax.devices()[:8])
    spec = partitioning.fit_spec(jax.P("tensor", "fsdp"), (2222, 64), mesh)
    assert spec == jax.P(None, "fsdp")
    assert partitioning.fit_spec(jax.P(("fsdp", "tensor")), (16, 3), mesh) == jax.P(("fsdp", "tensor"), None)


def test_batch_must_split_over_the_mesh():
    mesh = partitioning.make_mesh(dict(data=1, fsdp=4, tensor=1), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="multiple of data x fsdp = 4"):
        partitioning.check_batch_divisible(6, mesh, 1)


def test_parameters_are_sharded_by_the_rules(store):
    config = loop.resolve_config(tiny_config(store), _open(store))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    trainer = Trainer(config, get_objective("scfoundation"), mesh)
    shardings = jax.tree.leaves(trainer.state_sharding.params)
    specs = {tuple(s.spec) for s in shardings}
    # the rules put embed on fsdp and mlp/heads/genes on tensor: both axes must be used
    assert any("fsdp" in spec for spec in specs) and any("tensor" in spec for spec in specs)
    # optimiser moments follow their parameters
    mu = trainer.state_sharding.opt_state[-1][0].mu
    assert jax.tree.leaves(mu)[0].spec == shardings[0].spec


def test_model_flops_count_every_layer_chunk_and_micro_batch(store):
    """XLA's cost analysis counts a loop body once, so MFU's FLOPs come from the loop-free model
    (layers unrolled): the same count whatever the remat, attention chunking or micro-batching."""
    import contextlib

    from scfm_jax.models import layers

    rng = np.random.default_rng(0)
    gene_ids = np.stack([np.sort(rng.choice(120, 64, replace=False)) for _ in range(8)])
    counts = rng.integers(1, 50, (8, 64)).astype(np.float32)
    local = dict(gene_ids=gene_ids.astype(np.int32), counts=counts,
                 total_counts=counts.sum(1), num_nonzero=np.full(8, 64, np.int32))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    batch = partitioning.global_batch(local, mesh)
    counted = {}
    for name, remat, chunk, accum in (("loop-free", "none", 4096, 1), ("looped", "full", 32, 2)):
        config = loop.resolve_config(tiny_config(store), _open(store))
        config.model.encoder.depth, config.model.decoder.depth = 2, 3
        config.model.remat_policy, config.model.decoder.chunk_size = remat, chunk
        config.train.grad_accum_steps = accum
        trainer = Trainer(config, get_objective("scfoundation"), mesh)
        # the reference: the loop-free step compiled with its layer scan unrolled
        unrolled = layers.unrolled_layers() if name == "loop-free" else contextlib.nullcontext()
        with unrolled:
            compiled = trainer.compiled_train_step(trainer.abstract_sharded_state(), batch)
        counted[name] = (trainer.model_flops(batch), compiled.cost_analysis()["flops"])
    np.testing.assert_allclose(counted["looped"][0], counted["loop-free"][0], rtol=0.02)
    # the compiled loop-free step (plus the optimiser update) is what model_flops counts
    np.testing.assert_allclose(counted["loop-free"][0], counted["loop-free"][1], rtol=0.1)
    assert counted["looped"][1] < 0.7 * counted["looped"][0], counted  # bodies counted once


def _open(store):
    from scfm_jax.data.store import CellStore
    return CellStore.open(store)


def _losses(workdir):
    return {step: record["train/loss"] for step, record in read_metrics(workdir).items()
            if "train/loss" in record}


def test_same_seed_same_losses_and_resume_continues_exactly(store, tmp_path):
    config = tiny_config(store, steps=6)
    one_device = jax.devices()[:1]
    full = loop.train(config, tmp_path / "full", progress=False, devices=one_device)
    again = loop.train(config, tmp_path / "again", progress=False, devices=one_device)
    assert full["losses"] == again["losses"]
    assert all(math.isfinite(v) for v in full["losses"].values())

    # Stop after 3 steps (a checkpoint, as on preemption), then resume in the same workdir.
    stopped = loop.train(config, tmp_path / "resumed", progress=False, devices=one_device,
                         stop_after=3)
    assert stopped["stopped_early"] and stopped["final_step"] == 3
    resumed = loop.train(config, tmp_path / "resumed", progress=False, devices=one_device)
    assert resumed["start_step"] == 3
    assert {s: resumed["losses"][s] for s in (4, 5, 6)} == {s: full["losses"][s] for s in (4, 5, 6)}
    assert (tmp_path / "full" / "config.json").exists()
    assert any((tmp_path / "full" / "tensorboard").iterdir())
    logged = _losses(tmp_path / "resumed")
    assert logged == {s: full["losses"][s] for s in range(1, 7)}

    # the resolved config and the data position travel with the checkpoint
    saved = Checkpoints(tmp_path / "resumed", read_only=True).restore_metadata()
    assert saved["config"]["model"]["num_genes"] == len(_open(store).vocabulary)
    assert saved["data"] == {"step": 6, "seed": 0}
    assert saved["vocabulary"]["digest"] == _open(store).vocabulary.digest
    on_disk = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert on_disk["train"]["steps"] == 6


def test_checkpoint_restores_on_fewer_devices(store, tmp_path):
    config = tiny_config(store, steps=3)
    config.mesh.update(data=1, fsdp=4, tensor=1)
    config.data.global_batch_size = 8
    workdir = tmp_path / "fsdp4"
    # train on 4 devices with fsdp=4
    mesh4 = partitioning.make_mesh(config.mesh, devices=jax.devices()[:4])
    resolved = loop.resolve_config(config, _open(store))
    trainer4 = Trainer(resolved, get_objective("scfoundation"), mesh4)
    state4 = trainer4.init_state(0)
    checkpoints = Checkpoints(workdir)
    checkpoints.save(1, state4, config=resolved, seed=0, vocabulary={"digest": "x"})
    checkpoints.close()
    saved = jax.tree.map(np.asarray, state4.params)
    for devices in (2, 1):
        mesh = partitioning.make_mesh(dict(data=1, fsdp=-1, tensor=1),
                                      devices=jax.devices()[:devices])
        trainer = Trainer(resolved, get_objective("scfoundation"), mesh)
        restored = Checkpoints(workdir, read_only=True).restore_state(
            trainer.abstract_sharded_state())
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored.params)):
            np.testing.assert_array_equal(a, np.asarray(b))
        leaf = jax.tree.leaves(restored.params)[0]
        assert len(leaf.sharding.device_set) == devices


def test_divergence_stops_with_the_step_and_keeps_the_checkpoint(store, tmp_path):
    config = tiny_config(store, steps=40)
    config.train.update(learning_rate=1e12, warmup_steps=1, grad_clip_norm=0.0,
                        checkpoint_every=1, eval_every=100)
    with pytest.raises(loop.TrainingDiverged, match=r"at step \d+") as error:
        loop.train(config, tmp_path / "nan", progress=False, devices=jax.devices()[:1])
    step = int(str(error.value).split("at step ")[1].split(";")[0])
    checkpoints = Checkpoints(tmp_path / "nan", read_only=True)
    assert checkpoints.latest_step() == step  # every finished step was checkpointed, not the bad one
    assert "intact" in str(error.value)


def test_config_overrides_and_a_typo_with_a_suggestion(tmp_path):
    for form in (["--config=configs/scfoundation_tiny.py"],
                 ["--config", "configs/scfoundation_tiny.py"]):
        parsed = loop._parse(form + ["--workdir", str(tmp_path), "--config.data.store=/s",
                                     "--config.train.steps", "7", "--config.mesh.fsdp=2"])
        assert (parsed.config.data.store, parsed.config.train.steps) == ("/s", 7)
        assert parsed.config.mesh.fsdp == 2
    with pytest.raises(AttributeError, match='Did you mean "steps"'):
        loop._parse(["--config", "configs/scfoundation_tiny.py", "--workdir", str(tmp_path),
                     "--config.train.stpes=3"])


@pytest.mark.slow
def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(store, tmp_path):
    """SIGKILL the real CLI at an arbitrary step, start it again, compare every logged loss."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = 12
    base = [sys.executable, "-m", "scfm_jax.main", "train", "--config",
            "configs/scfoundation_tiny.py", "--num_cpu_devices", "1"]
    overrides = _overrides(tiny_config(store, steps=steps))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(__file__))
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run(base + ["--workdir", str(uninterrupted)] + overrides, cwd=root, env=env,
                   check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    process = subprocess.Popen(base + ["--workdir", str(killed)] + overrides, cwd=root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once some steps past the first checkpoint are logged
        logged = _losses(killed)
        if logged and max(logged) >= 5:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_losses(killed)) < steps, "the run finished before it could be killed"
    subprocess.run(base + ["--workdir", str(killed)] + overrides, cwd=root, env=env, check=True,
                   capture_output=True, timeout=600)
    assert _losses(killed) == _losses(uninterrupted)
    assert sorted(_losses(killed)) == list(range(1, steps + 1))


def _overrides(config) -> list[str]:
    """--config.x=y flags reproducing the fields tiny_config changes from the file's defaults."""
    from scfm_jax.configs import scfoundation_tiny

    default = scfoundation_tiny.get_config().to_dict()
    flags = []

    def walk(prefix, value, reference):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item, reference.get(key, {}))
        elif value != reference:
            text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            flags.append(f"--config{prefix}=({text},)" if isinstance(value, (tuple, list))
                         else f"--config{prefix}={text}")

    walk("", config.to_dict(), default)
    return flags


@pytest.mark.slow
def test_two_processes_match_one_process_and_a_single_process_restores(store, tmp_path):
    """2 processes x 2 devices (jax.distributed over localhost) vs 1 process x 4 devices."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(__file__))
    config = tiny_config(store, steps=4)
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    overrides = _overrides(config)
    command = [sys.executable, "-m", "scfm_jax.main", "train", "--config",
               "configs/scfoundation_tiny.py"] + overrides
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(command + ["--workdir", str(tmp_path / "one"), "--num_cpu_devices", "4"],
                   cwd=root, env=env, check=True, capture_output=True, timeout=600)
    result = subprocess.run(
        ["bash", "launch/local_processes.sh", "2", "2", "--"] + command +
        ["--workdir", str(tmp_path / "two")], cwd=root, env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)

    # the checkpoint written by two processes restores in this single process on one device
    resolved = loop.resolve_config(config, _open(store))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    trainer = Trainer(resolved, get_objective("scfoundation"), mesh)
    restored = Checkpoints(tmp_path / "two", read_only=True).restore_state(
        trainer.abstract_sharded_state())
    reference = Checkpoints(tmp_path / "one", read_only=True).restore_state(
        trainer.abstract_sharded_state())
    assert int(restored.step) == 4
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sharded_train_steps_of_the_large_configs_compile_for_64_devices():
    """Per-device parameter + optimiser memory falls as the mesh grows and every large parameter is
    sharded, read from XLA's compiled memory analysis of the 100M and 1B train steps."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(__file__))
    for config, layouts in (("scfoundation_100m", ["8,1", "16,4"]), ("scfoundation_1b", ["16,4"])):
        result = subprocess.run(
            [sys.executable, "tests/compile_memory.py", "64", config, *layouts], cwd=root,
            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
            timeout=2400)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert len(rows) == len(layouts)
        full_state = rows[0]["parameters"] * 4 * 3  # parameters + Adam moments, float32
        for row in rows:
            # the step's arguments (state + batch) are close to 1/devices of the whole state: a
            # replicated large parameter (the 100M gene table alone is 12% of it) breaks this
            assert row["argument_bytes_per_device"] < 2 * full_state / row["devices"], row
            assert row["argument_bytes_per_device"] >= row["state_bytes_per_device"]
        if len(rows) == 2:
            assert rows[1]["argument_bytes_per_device"] < 0.25 * rows[0]["argument_bytes_per_device"]
        print(json.dumps(rows))
