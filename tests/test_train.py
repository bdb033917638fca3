"""The train loop: meshes, sharded state, checkpoints across meshes, determinism and resume,
divergence, config overrides."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scfm_jax.errors import UsageError
from scfm_jax.objectives import get_objective
from scfm_jax.train import loop, partitioning
from scfm_jax.train.checkpointing import Checkpoints
from scfm_jax.train.metrics import read_metrics
from scfm_jax.train.trainer import Trainer
from scfm_jax.configs import scfoundation_tiny
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
    rules = dict(scfoundation_tiny.LOGICAL_AXIS_RULES)
    with pytest.raises(ValueError, match="multiple of data x fsdp = 4"):
        partitioning.check_batch_divisible(6, mesh, 1, tuple(rules.items()))
    # the batch rule, not the code, says where the batch goes
    rules["batch"] = "data"
    partitioning.check_batch_divisible(6, mesh, 1, tuple(rules.items()))
    assert partitioning.batch_sharding(mesh, 2, tuple(rules.items())).spec == jax.P("data", None)


def test_replicated_parameters_are_named_and_limited(store, caplog):
    config = loop.resolve_config(tiny_config(store), _open(store))
    config.model.encoder.mlp_dim = 15  # not divisible by tensor=2: the encoder's FF stays whole
    config.sharding_tolerance = 1.0
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=2), devices=jax.devices()[:2])
    with caplog.at_level("WARNING", logger="scfm_jax.train.partitioning"):
        Trainer(config, get_objective("scfoundation"), mesh)
    assert "encoder_layers.feed_forward.w1.kernel: dim 2 (15) not divisible by tensor=2" \
        in caplog.text
    assert "decoder_layers" not in caplog.text  # its mlp_dim (32) splits
    config.sharding_tolerance = 0.001
    with pytest.raises(ValueError, match=r"replicated because mesh .* does not divide"):
        Trainer(config, get_objective("scfoundation"), mesh)


def test_parameters_are_sharded_by_the_rules(store):
    config = loop.resolve_config(tiny_config(store), _open(store))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    trainer = Trainer(config, get_objective("scfoundation"), mesh)
    shardings = jax.tree.leaves(trainer.state_sharding.params)
    specs = {tuple(s.spec) for s in shardings}
    # the rules put embed on fsdp and mlp/heads/genes on tensor: both axes must be used
    assert any("fsdp" in spec for spec in specs) and any("tensor" in spec for spec in specs)
    # every optimiser moment follows its parameter
    adam = trainer.state_sharding.opt_state[-1][0]
    for moments in (adam.mu, adam.nu):
        assert [m.spec for m in jax.tree.leaves(moments)] == [p.spec for p in shardings]
    # the stacked layer axis is never split: every device holds every layer
    layer_kernel = trainer.state_sharding.params["encoder_layers"]["feed_forward"]["w1"]["kernel"]
    assert jax.tree.leaves(layer_kernel)[0].spec == jax.P(None, "fsdp", "tensor")


def test_model_flops_count_every_layer_chunk_and_micro_batch(store):
    """XLA's cost analysis counts a loop body once, so MFU's FLOPs come from the loop-free model
    (layers unrolled): the same count whatever the remat, attention chunking or micro-batching."""
    rng = np.random.default_rng(0)
    gene_ids = np.stack([np.sort(rng.choice(120, 64, replace=False)) for _ in range(8)])
    counts = rng.integers(1, 50, (8, 64)).astype(np.float32)
    local = dict(gene_ids=gene_ids.astype(np.int32), counts=counts,
                 total_counts=counts.sum(1), num_nonzero=np.full(8, 64, np.int32))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    batch = partitioning.global_batch(local, mesh, scfoundation_tiny.LOGICAL_AXIS_RULES)
    counted = {}
    for name, remat, chunk, accum in (("loop-free", "none", 4096, 1), ("looped", "full", 32, 2)):
        config = loop.resolve_config(tiny_config(store), _open(store))
        config.model.encoder.depth, config.model.decoder.depth = 2, 3
        config.model.remat_policy, config.model.decoder.chunk_size = remat, chunk
        config.train.grad_accum_steps = accum
        # the reference: the loop-free step compiled with its layer scans unrolled
        config.model.unroll_layers = name == "loop-free"
        trainer = Trainer(config, get_objective("scfoundation"), mesh)
        compiled = trainer.compile_train_step(trainer.abstract_sharded_state(), batch)
        counted[name] = (trainer.model_flops(batch), compiled.cost_analysis()["flops"])
    np.testing.assert_allclose(counted["looped"][0], counted["loop-free"][0], rtol=0.02)
    # the compiled loop-free step (plus the optimiser update) is what model_flops counts
    np.testing.assert_allclose(counted["loop-free"][0], counted["loop-free"][1], rtol=0.1)
    assert counted["looped"][1] < 0.7 * counted["looped"][0], counted  # bodies counted once


def test_model_flops_count_every_attention_block():
    """The blockwise attention (the CPU's `auto`) loops over key blocks of 512; the FLOP count
    must not see one block only. 1,100 genes: three key blocks."""
    config = scfoundation_tiny.get_config()
    config.model.num_genes, config.model.bin_num = 1200, 8
    config.model.encoder.update(width=16, depth=1, heads=2, mlp_dim=32)
    config.model.decoder.update(width=16, depth=1, heads=2, head_dim=8, mlp_dim=32)
    config.data.global_batch_size = 2
    config.train.grad_accum_steps = 1
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    batch = {"gene_ids": jax.ShapeDtypeStruct((2, 1100), jnp.int32),
             "counts": jax.ShapeDtypeStruct((2, 1100), jnp.float32),
             "total_counts": jax.ShapeDtypeStruct((2,), jnp.float32),
             "num_nonzero": jax.ShapeDtypeStruct((2,), jnp.int32)}
    flops = {}
    for impl in ("blockwise", "xla"):
        config.model.attention_impl = impl
        flops[impl] = Trainer(config, get_objective("scfoundation"), mesh).model_flops(batch)
    assert flops["blockwise"] == pytest.approx(flops["xla"], rel=1e-6)


def _open(store):
    from scfm_jax.data.store import CellStore
    return CellStore.open(store)


def _losses(workdir):
    return {step: record["train/loss"] for step, record in read_metrics(workdir).items()
            if "train/loss" in record}


def test_micro_batches_follow_the_gradient_of_the_whole_batch(store):
    """k micro-batches weighted by their loss terms give the update of one batch of the same
    cells, where a mean of the micro-batch means would not (cells express different numbers of
    genes). The loss here has no random draws, so both see the very same terms."""
    import dataclasses

    import jax.numpy as jnp

    from scfm_jax.objectives import scfoundation as sf_objective

    def expressed_mse(model, batch, key, objective_config):
        inputs = sf_objective.inference_inputs(batch, num_genes=model.num_genes)
        predictions = model(inputs["encoder_values"], inputs["encoder_gene_ids"],
                            inputs["encoder_padding_mask"], inputs["decoder_values"])
        mask = inputs["decoder_values"] > 0
        loss = sf_objective.masked_mse(predictions, inputs["decoder_values"], mask)
        return loss, {"terms": jnp.sum(mask).astype(jnp.float32), "first_prediction":
                      predictions[0, 0]}

    objective = dataclasses.replace(get_objective("scfoundation"), loss=expressed_mse,
                                    weight_metric="terms")
    mesh = partitioning.make_mesh(dict(data=1, fsdp=2, tensor=1), devices=jax.devices()[:2])
    results, trainers = {}, {}
    for accum in (1, 2):
        config = loop.resolve_config(tiny_config(store), _open(store))
        config.train.grad_accum_steps = accum
        trainers[accum] = trainer = Trainer(config, objective, mesh)
        state = trainer.init_state(0)
        batch = loop.host_to_device(loop.make_pipelines(config, _open(store))[0].batch(0), trainer)
        results[accum] = jax.jit(trainer._grads)(state.params, state.buffers, batch,
                                                 jax.random.key(0))
    (loss, metrics, grads), (micro_loss, micro_metrics, micro_grads) = results[1], results[2]
    np.testing.assert_allclose(micro_loss, loss, rtol=1e-5)
    assert micro_metrics["terms"] == metrics["terms"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 micro_grads, grads)
    # the unweighted mean of the two halves' losses is measurably different
    halves = [trainers[1]._loss(state.params, state.buffers,
                                jax.tree.map(lambda x, i=i: x[4 * i:4 * i + 4], batch),
                                jax.random.key(0))[0] for i in range(2)]
    assert abs(float(np.mean(halves)) - float(loss)) > 1e-4 * float(loss), (halves, loss)


def test_checkpoints_keep_the_latest_and_the_best(store, tmp_path):
    config = loop.resolve_config(tiny_config(store), _open(store))
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    state = Trainer(config, get_objective("scfoundation"), mesh).init_state(0)
    checkpoints = Checkpoints(tmp_path, keep=1)
    for step, eval_loss in zip(range(1, 6), (0.5, 0.2, 0.9, None, 0.7)):
        checkpoints.save(step, state, config=config, seed=0, vocabulary={"digest": "x"},
                         eval_loss=eval_loss)
    checkpoints.close()
    # the latest (5) and the lowest held-out loss (2); the others are deleted
    assert Checkpoints(tmp_path, read_only=True).all_steps() == [2, 5]



def test_checkpoints_in_another_folder_load_from_the_workdir(store, tmp_path, monkeypatch):
    """train.checkpoint_dir (relative here) keeps the checkpoints out of the workdir; config.json
    records the absolute folder, so the workdir loads from any current directory."""
    from scfm_jax.analysis.loading import load
    monkeypatch.chdir(tmp_path)
    config = tiny_config(store, steps=3)
    config.train.checkpoint_dir = "elsewhere/checkpoints"
    loop.train(config, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "checkpoints").exists()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["checkpoint_dir"]
    assert saved == str(tmp_path / "elsewhere" / "checkpoints")
    monkeypatch.chdir("/")
    assert load(tmp_path / "run").step == 3


def test_same_seed_same_losses_and_resume_continues_exactly(store, tmp_path):
    config = tiny_config(store, steps=6)
    trainer = loop.make_trainer(config, devices=jax.devices()[:1])   # one compile for every run
    full = loop.train(config, tmp_path / "full", progress=False, trainer=trainer)
    again = loop.train(config, tmp_path / "again", progress=False, trainer=trainer)
    assert full["losses"] == again["losses"]
    assert all(math.isfinite(v) for v in full["losses"].values())

    # Stop after 3 steps (a checkpoint, as on preemption), then resume in the same workdir.
    stopped = loop.train(config, tmp_path / "resumed", progress=False, trainer=trainer,
                         stop_after=3)
    assert stopped["stopped_early"] and stopped["final_step"] == 3
    resumed = loop.train(config, tmp_path / "resumed", progress=False, trainer=trainer)
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
    with pytest.raises(UsageError, match="did you mean --config.train.steps"):
        loop._parse(["--config", "configs/scfoundation_tiny.py", "--workdir", str(tmp_path),
                     "--config.train.stpes=3"])


CLI_STEPS = 12


def _cli(store, workdir, *extra):
    """The real CLI command (`python -m scfm_jax.main train`) and its environment."""
    import os
    import sys

    command = [sys.executable, "-m", "scfm_jax.main", "train", "--config",
               "configs/scfoundation_tiny.py", "--num-cpu-devices", "1", "--workdir", str(workdir),
               *_overrides(tiny_config(store, steps=CLI_STEPS)), *extra]
    return dict(args=command, cwd=os.path.dirname(os.path.dirname(__file__)),
                env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def uninterrupted_cli(store, tmp_path_factory):
    """The logged losses of an uninterrupted CLI run (shared by the interruption tests)."""
    import subprocess

    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(**_cli(store, workdir), check=True, capture_output=True, timeout=600)
    return _losses(workdir)


def _start_and_wait_for_step(store, workdir, step, *extra):
    import subprocess
    import time

    process = subprocess.Popen(**_cli(store, workdir, *extra), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        logged = _losses(workdir)
        if logged and max(logged) >= step:
            break
        time.sleep(0.2)
    return process


@pytest.mark.slow
def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(store, uninterrupted_cli,
                                                                   tmp_path):
    """SIGKILL the real CLI at an arbitrary step, start it again, compare every logged loss."""
    import signal
    import subprocess

    killed = tmp_path / "killed"
    process = _start_and_wait_for_step(store, killed, 5)  # past the first checkpoint (3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(_losses(killed)) < CLI_STEPS, "the run finished before it could be killed"
    subprocess.run(**_cli(store, killed), check=True, capture_output=True, timeout=600)
    assert _losses(killed) == uninterrupted_cli
    assert sorted(_losses(killed)) == list(range(1, CLI_STEPS + 1))


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_exits_cleanly_and_resumes(store, uninterrupted_cli,
                                                                        tmp_path):
    """SIGTERM (a preemption notice): the CLI saves at the next step boundary and exits 75 saying
    so; the same command resumes from that checkpoint with the losses of an uninterrupted run."""
    import signal
    import subprocess

    workdir = tmp_path / "preempted"
    # no periodic checkpoint before the end: the one found must be SIGTERM's
    no_periodic = "--config.train.checkpoint_every=1000"
    process = _start_and_wait_for_step(store, workdir, 3, no_periodic)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 75, stderr.decode()[-3000:]
    saved = Checkpoints(workdir, read_only=True).all_steps()
    logged = max(_losses(workdir))
    assert saved == [logged] and 3 <= logged < CLI_STEPS, (saved, logged)
    assert f"preempted at step {logged}; rerun to resume" in stderr.decode()
    subprocess.run(**_cli(store, workdir, no_periodic), check=True, capture_output=True,
                   timeout=600)
    assert _losses(workdir) == uninterrupted_cli
    assert Checkpoints(workdir, read_only=True).latest_step() == CLI_STEPS


def _overrides(config) -> list[str]:
    """--config.x=y flags reproducing the fields tiny_config changes from the file's defaults."""
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
    subprocess.run(command + ["--workdir", str(tmp_path / "one"), "--num-cpu-devices", "4"],
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
        # atol 1e-5: float32 reduction order differs between gloo's cross-process all-reduce and
        # the in-process one; it shows only on parameters within ~1e-6 of zero (as in
        # test_launchers), while the losses above agree to rtol 1e-5 at every step
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.heavy
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
