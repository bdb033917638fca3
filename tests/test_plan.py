"""`scfm-jax plan`: TPU slice names, collective accounting, and the train step compiled for real
TPU topologies by libtpu's compiler (deviceless; no TPU needed)."""
import math
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scfm_jax.configs import scfoundation_100m, scfoundation_tiny
from scfm_jax.main import main as scfm_main
from scfm_jax.train import chips, partitioning, plan

needs_libtpu = pytest.mark.skipif(
    not plan.libtpu_available(),
    reason='libtpu is not installed (pip install -e ".[tpu]"); .ci/run installs it')


def tiny_plan_config():
    """scfoundation_tiny at the train tests' size, with the gene count a store would give."""
    config = scfoundation_tiny.get_config()
    config.model.num_genes = 120
    config.model.bin_num = 8
    config.model.encoder.update(width=16, depth=1, heads=2, mlp_dim=32)
    config.model.decoder.update(width=16, depth=1, heads=2, head_dim=8, mlp_dim=32, chunk_size=64)
    config.data.global_batch_size = 8
    config.data.buckets = (64,)
    return config


@pytest.mark.parametrize("name, topology_name, chips, generation", [
    ("v5e-8", "v5e:2x4", 8, "v5e"), ("v5e-64", "v5e:8x8", 64, "v5e"),
    ("v5p-8", "v5:2x2x1", 4, "v5p"), ("v5p-64", "v5:2x4x4", 32, "v5p"),
    ("v4-16", "v4:2x2x2", 8, "v4"), ("v6e-256", "v6e:16x16", 256, "v6e"),
    ("v5e:4x4", "v5e:4x4", 16, "v5e"), ("v5p:2x2x2", "v5:2x2x2", 8, "v5p"),
])
def test_slice_names_map_to_libtpu_topologies(name, topology_name, chips, generation):
    topology = plan.parse_topology(name)
    assert (topology.topology_name, topology.num_chips, topology.generation) == (
        topology_name, chips, generation)


@pytest.mark.parametrize("name", ["v5e-6", "v5p-7", "v7-8", "tpu", "v5e:2y4"])
def test_bad_slice_names_are_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="--topology"):
        plan.parse_topology(name)


def test_collectives_are_read_from_the_compiled_program():
    # An 8-way sharded sum compiles to one all-reduce of the f32 result on the CPU devices.
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("x",))
    summed = jax.jit(lambda a: jnp.sum(a, axis=0), in_shardings=NamedSharding(mesh, PartitionSpec("x")),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    compiled = summed.lower(jax.ShapeDtypeStruct((64, 1000), jnp.float32)).compile()
    collectives = plan.collective_bytes(compiled.as_text())
    assert set(collectives) == {"all-reduce"}
    assert collectives["all-reduce"] == (1, 1000 * 4)



def test_heaviest_ops_weigh_each_instruction_by_the_loops_around_it():
    """XLA's cost analysis counts a loop body once; the op inside a 5-step loop moves its bytes
    5 times per step (its f32[1000] operand and result: 8,000 bytes a time), the one after it once."""
    def step(x):
        return jnp.cos(jax.lax.fori_loop(0, 5, lambda i, c: jnp.sin(c) * 2.0, x))

    compiled = jax.jit(step).lower(jax.ShapeDtypeStruct((1000,), jnp.float32)).compile()
    rows = {op_name.rsplit("/", 1)[-1]: (moved, runs)
            for moved, runs, _, _, op_name in plan.heaviest_ops(compiled.as_text())}
    assert rows["mul"] == (5 * 8000, 5)
    assert rows["cos"] == (8000, 1)
    # without the compiler's known_trip_count, the bound the loop condition compares with
    text = re.sub(r',?"known_trip_count":\{"n":"5"\}', "", compiled.as_text())
    assert max(plan.heaviest_ops(text), key=lambda row: row[1])[1] == 5


ASYNC_HLO = """
  %all-gather-start.3 = (bf16[64,128]{1,0:T(8,128)(2,1)}, bf16[1024,128]{1,0:T(8,128)(2,1)}) all-gather-start(bf16[64,128]{1,0:T(8,128)(2,1)} %p.1), channel_id=7, replica_groups=[1,16]<=[16], dimensions={0}, metadata={op_name="jit(step)/decoder/dot_general" source_file="x.py"}
  %all-gather-done.3 = bf16[1024,128]{1,0:T(8,128)(2,1)} all-gather-done((bf16[64,128]{1,0}, bf16[1024,128]{1,0}) %all-gather-start.3)
  %collective-permute-start.1 = (f32[8,16]{1,0}, f32[8,16]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(f32[8,16]{1,0} %x), channel_id=9, source_target_pairs={{0,1},{1,0}}
  %all-reduce.2 = f32[1000]{0} all-reduce(f32[1000]{0} %y), channel_id=3, to_apply=%add
"""


def test_async_collectives_count_their_results_only():
    """An async start's value holds its operands, its results and scalar contexts: only the
    results count (an all-gather's is 16x its operand here), and the largest comes first with
    the JAX op that asked for it."""
    assert plan.collective_bytes(ASYNC_HLO) == {
        "all-gather": (1, 1024 * 128 * 2), "collective-permute": (1, 8 * 16 * 4),
        "all-reduce": (1, 1000 * 4)}
    kind, size, shape, op_name = plan.largest_collectives(ASYNC_HLO, 1)[0]
    assert (kind, size, op_name) == ("all-gather", 1024 * 128 * 2, "jit(step)/decoder/dot_general")
    assert shape.startswith("(bf16[64,128]")


def test_roofline_is_the_slower_of_compute_and_memory():
    chip = chips.TPUS["v5e"]
    row = plan.PlanRow(step="train", bucket=8, global_batch=8, remat="none", mesh={},
                       compile_seconds=0.0, model_flops=chip.peak_flops * 2e-3, xla_flops=0.0,
                       xla_bytes=chip.hbm_bandwidth * 1e-3, hbm_bytes=chip.hbm_bytes,
                       peak_flops=chip.peak_flops, hbm_bandwidth=chip.hbm_bandwidth)
    assert row.roofline_seconds == pytest.approx(2e-3)
    assert row.roofline_mfu == pytest.approx(1.0)
    row.xla_bytes = chip.hbm_bandwidth * 4e-3  # memory-bound: half the time is spent computing
    assert row.roofline_mfu == pytest.approx(0.5)
    # XLA saw a quarter of the FLOPs (a loop body once): its bytes are scaled the same way
    row.xla_flops, row.xla_bytes = row.model_flops / 4, chip.hbm_bandwidth * 1e-3
    assert row.bytes_estimate == pytest.approx(4 * row.xla_bytes)
    assert row.roofline_seconds == pytest.approx(4e-3)


@pytest.mark.parametrize("config_batch, largest_fitting, expected, compiled", [
    (128, 512, 512, [128, 256, 512, 1024]),   # fits at the config's batch: doubles until it fails
    (128, 32, 32, [32, 64, 128]),             # does not: halves until it fits
    (128, 8, 0, [16, 32, 64, 128]),           # not even the smallest (16) fits
    (100, 1 << 20, 4096, [128, 256, 512, 1024, 2048, 4096]),   # rounds to the grid; max_batch
])
def test_sweep_searches_from_the_config_batch(config_batch, largest_fitting, expected, compiled):
    # The search on its own, with a stand-in for the compile: a step "fits" up to a batch.
    config = tiny_plan_config()
    config.data.global_batch_size = config_batch
    config.train.grad_accum_steps = 2
    config.mesh.update(data=1, fsdp=8, tensor=1)   # the smallest batch the mesh splits: 8 x 2
    asked = []

    def plan_row(trial, devices, chip, *, step, bucket, global_batch):
        asked.append((trial.model.remat_policy, global_batch))
        return plan.PlanRow(step=step, bucket=bucket, global_batch=global_batch, mesh={},
                            remat=trial.model.remat_policy, compile_seconds=0.0, hbm_bytes=1e9,
                            temp_bytes=1 if global_batch <= largest_fitting else 2e9)

    reported = []
    results = plan.sweep(config, [None] * 8, None, policies=("dots", "full"), max_batch=4096,
                         plan_row=plan_row, on_row=lambda row: reported.append(row.global_batch))
    assert {policy: best for policy, (best, _) in results.items()} == {"dots": expected,
                                                                       "full": expected}
    assert [r.global_batch for r in results["full"][1]] == compiled
    assert sorted(b for policy, b in asked if policy == "dots") == compiled
    assert reported == [b for _, b in asked]   # progress after each compile, in order


def test_scmulan_plans_without_a_store():
    """A token set of the config's size stands in for the store's; the train step traces on it."""
    from scfm_jax.configs import scmulan_tiny
    from scfm_jax.objectives import get_objective
    from scfm_jax.train.trainer import Trainer

    config = plan.plan_config(scmulan_tiny.get_config())
    assert len(config.objective.gene_set) == config.objective.num_genes
    assert config.model.vocab_size > config.objective.num_genes
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    trainer = Trainer(config, get_objective("scmulan"), mesh)
    batch = plan.abstract_batch(config, mesh, 128, 8)
    assert {"obs/bulk_labels", "obs/phase"} <= set(batch)
    _, metrics = jax.eval_shape(trainer._train_step, trainer.abstract_state, batch)
    assert metrics["loss"].shape == ()


def test_plan_without_libtpu_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(plan, "libtpu_available", lambda: False)
    code = scfm_main(["plan", "--config", scfoundation_100m.__file__, "--topology", "v5e-8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1   # a missing optional package, as docs/reliability.md's exit codes say
    assert len(err) == 1 and "scfm-jax plan: error:" in err[0], err
    assert 'pip install -e ".[tpu]"' in err[0]


def _tiled_bytes(array) -> int:
    """Bytes of an array in TPU memory at most: its two minor dimensions padded to (8, 128) tiles,
    either way round, 4 bytes an element."""
    *major, rows, cols = (1, 1, *array.shape)
    return math.prod(major) * 4 * max(-(-rows // 8) * 8 * -(-cols // 128) * 128,
                                      -(-cols // 8) * 8 * -(-rows // 128) * 128)


@pytest.fixture(scope="module")
def tiny_rows():
    """The tiny train step compiled for a 1-chip and an 8-chip v5e slice, FSDP over all chips."""
    rows = {}
    for name in ("v5e-1", "v5e-8"):
        topology = plan.parse_topology(name)
        devices = plan.topology_devices(topology)
        config = tiny_plan_config()
        config.mesh.update(data=1, fsdp=len(devices), tensor=1)
        rows[name] = plan.plan(config, devices, topology.chip)[0]
    return rows


@needs_libtpu
def test_the_mesh_follows_the_slice_not_the_order_devices_are_given():
    """Training and the plan share one `make_mesh`: over compile-only topology devices it lays the
    mesh out by their physical coordinates, whatever order the devices come in."""
    devices = plan.topology_devices(plan.parse_topology("v5e-8"))
    shuffled = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
    mesh_config = dict(data=2, fsdp=4, tensor=1)
    ids = lambda mesh: [d.id for d in mesh.devices.flat]  # noqa: E731
    assert ids(partitioning.make_mesh(mesh_config, shuffled)) == ids(
        partitioning.make_mesh(mesh_config, devices))
    for row in partitioning.make_mesh(mesh_config, shuffled).devices[:, :, 0]:
        xs, ys = zip(*(d.coords[:2] for d in row))
        assert len(set(xs)) * len(set(ys)) == 4   # each fsdp group is a 2x2 box of chips


@needs_libtpu
def test_tiny_train_step_compiles_for_tpu_and_its_memory_is_sane(tiny_rows):
    from scfm_jax.train.trainer import Trainer
    from scfm_jax.objectives import get_objective

    for name, row in tiny_rows.items():
        assert not row.error and row.fits and 0.9 < row.headroom < 1.0
        assert row.model_flops > 0 and row.xla_flops > 0 and row.xla_bytes > 0
        assert row.roofline_seconds > 0 and 0 < row.roofline_mfu <= 1
    one, eight = tiny_rows["v5e-1"], tiny_rows["v5e-8"]
    # On one chip the arguments are the whole state and batch: check against their real size.
    config = tiny_plan_config()
    config.mesh.update(data=1, fsdp=1, tensor=1)
    devices = plan.topology_devices(plan.parse_topology("v5e-1"))
    trainer = Trainer(config, get_objective("scfoundation"), partitioning.make_mesh(config.mesh, devices))
    arguments = jax.tree.leaves(trainer.abstract_state) + list(
        plan.abstract_batch(config, trainer.mesh, 64, 8).values())
    assert one.argument_bytes >= sum(math.prod(a.shape) * a.dtype.itemsize for a in arguments)
    assert one.argument_bytes <= sum(map(_tiled_bytes, arguments))
    assert not one.collectives
    # Eight chips of FSDP: the per-chip state falls, and parameters are gathered for the step.
    assert eight.argument_bytes < one.argument_bytes / 2
    assert "all-gather" in eight.collectives
    sizes = [size for _, size, _, _ in eight.largest_collectives]
    assert sizes == sorted(sizes, reverse=True) and 0 < sizes[0] <= max(
        size for _, size in eight.collectives.values())
    assert eight.model_flops == pytest.approx(one.model_flops / 8)


def _activation_gathers(row, batch: int, lengths: set[int]) -> list:
    """The all-gathers among a row's largest collectives whose result is a [batch, length, D]
    activation (an async start's value also holds its operand, 1/chips of the batch)."""
    found = []
    for kind, _, shape, op_name in row.largest_collectives:
        for dims in re.findall(r"\[([\d,]+)\]", shape):
            dims = [int(d) for d in dims.split(",")]
            if kind == "all-gather" and len(dims) == 3 and dims[0] == batch and dims[1] in lengths:
                found.append((shape, op_name))
    return found


@needs_libtpu
def test_fsdp_step_gathers_weights_not_activations(tiny_rows):
    """Under FSDP on 8 chips each chip keeps its cells' activations; only weights travel. Before
    the tables were gathered for their lookups, the lookup's output came out split on the embed
    dimension and the step all-gathered whole [batch, 122, 16] activations (on the 1B config on
    v5p-64: [64, 19266, 1536], 3.8 GB per chip and micro-batch)."""
    config = tiny_plan_config()
    lengths = {config.model.num_genes + 2, *(b + 2 for b in config.data.buckets),
               *config.data.buckets}
    assert tiny_rows["v5e-8"].largest_collectives
    assert _activation_gathers(tiny_rows["v5e-8"], config.data.global_batch_size, lengths) == []


@needs_libtpu
def test_plan_cli_prints_a_row_per_bucket():
    config = scfoundation_tiny.__file__
    overrides = ["--config.model.num_genes=120", "--config.model.encoder.depth=1",
                 "--config.model.encoder.width=16", "--config.model.encoder.mlp_dim=32",
                 "--config.model.decoder.depth=1", "--config.model.decoder.width=16",
                 "--config.model.decoder.mlp_dim=32", "--config.data.global_batch_size=8",
                 "--config.data.buckets=(32,64)", "--config.mesh.data=1", "--config.mesh.fsdp=4"]
    result = subprocess.run(
        [sys.executable, "-m", "scfm_jax.main", "plan", "--config", config, "--topology", "v5e-4",
         "--heaviest-ops", "2", *overrides], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith("train ")]
    assert [(r[1], r[2], r[4]) for r in rows] == [("32", "8", "1,4,1"), ("64", "8", "1,4,1")]
    assert all("yes" in r for r in rows)
    assert any("cloud.google.com/tpu/docs/v5e" in line for line in lines)
    # each row's largest collectives follow, the biggest first, with the JAX op behind each
    start = lines.index("largest collectives, train bucket 64 batch 8:")
    listed = [line.split() for line in lines[start + 1:start + 4]]
    assert len(listed) == 3 and all(line[0] in plan.COLLECTIVES for line in listed)
    # and the instructions that move the most bytes, loop trip counts applied
    start = lines.index("heaviest ops, train bucket 64 batch 8 (bytes of results and operands x "
                        "runs per step):")
    listed = [line.split() for line in lines[start + 1:start + 3]]
    assert len(listed) == 2 and all(line[0].endswith("B") and line[1][0] == "x" for line in listed)


def test_train_dry_run_prints_the_plan_for_the_devices_at_hand(tmp_path, capsys):
    from train_helpers import make_store, tiny_config

    from scfm_jax.train.loop import train

    config = tiny_config(make_store(tmp_path))
    config.data.buckets = (64,)
    config.mesh.update(data=1, fsdp=4, tensor=1)
    summary = train(config, tmp_path / "run", devices=jax.devices()[:4], progress=False,
                    dry_run=True)
    (row,) = summary["plan"]
    assert (row.bucket, row.global_batch, row.mesh["fsdp"]) == (64, 8, 4)
    assert row.argument_bytes > 0 and row.model_flops > 0 and row.fits is None  # CPU: no HBM
    assert "all-gather" in row.collectives
    assert capsys.readouterr().out.splitlines()[1].split()[:5] == ["train", "64", "8", "none",
                                                                    "1,4,1"]
    assert not (tmp_path / "run" / "checkpoints").exists()


@needs_libtpu
def test_bfloat16_step_compiles_the_kernels_for_tpu():
    """On a TPU mesh `auto` is the Pallas flash and FAVOR+ kernels, run per device (XLA cannot
    partition a kernel) and in bfloat16, which the kernels' float32-precision matmuls once made
    Mosaic refuse ("Bad lhs type"). The program holds both kernels as TPU custom calls."""
    topology = plan.parse_topology("v5e-8")
    devices = plan.topology_devices(topology)
    config = tiny_plan_config()
    config.model.dtype = "bfloat16"
    config.mesh.update(data=1, fsdp=len(devices), tensor=1)
    from scfm_jax.objectives import get_objective
    from scfm_jax.train.trainer import Trainer

    trainer = Trainer(config, get_objective("scfoundation"), partitioning.make_mesh(config.mesh, devices))
    compiled, _ = plan.compile_step(trainer, "train", 64, 8)
    text = compiled.as_text()
    assert "favor_key_pass" in text and "flash" in text.lower()
    assert "tpu_custom_call" in text


@needs_libtpu
def test_tpu_program_does_not_grow_with_depth(tiny_rows):
    """The layers run as one scan over stacked parameters, so a deeper model compiles to the same
    program. (Unrolled, each performer layer added ~11 MB of TPU code at 5,000 genes.)"""
    topology = plan.parse_topology("v5e-1")
    config = tiny_plan_config()
    config.mesh.update(data=1, fsdp=1, tensor=1)
    config.model.encoder.depth = config.model.decoder.depth = 3
    (deep,) = plan.plan(config, plan.topology_devices(topology), topology.chip)
    shallow = tiny_rows["v5e-1"]
    assert deep.model_flops > shallow.model_flops   # the layers are really there
    assert deep.code_bytes < 1.1 * shallow.code_bytes


@needs_libtpu
def test_1b_state_is_split_over_every_chip_of_v5e_64():
    """Per chip, the compiled arguments of the 1B train state on its 64-chip slice are 1/64 of it:
    no mesh axis holds a second copy. (The config's first mesh, data=-1 x fsdp=8 x tensor=4, kept
    two copies on 64 chips: 2.0x; the gene tables, replicated over `tensor`, add 1-2%.)"""
    from scfm_jax.configs import scfoundation_1b
    from scfm_jax.objectives import get_objective
    from scfm_jax.train.trainer import Trainer

    config = scfoundation_1b.get_config()
    devices = plan.topology_devices(plan.parse_topology("v5e-64"))
    trainer = Trainer(config, get_objective("scfoundation"), partitioning.make_mesh(config.mesh, devices))
    state = trainer.abstract_sharded_state()
    compiled = jax.jit(lambda s: jax.tree.map(jnp.copy, s)).lower(state).compile()
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state))
    assert total > 10e9   # parameters and two Adam moments of ~1B float32 values
    assert compiled.memory_analysis().argument_size_in_bytes <= 1.05 * total / 64


@pytest.mark.slow
@pytest.mark.heavy
@needs_libtpu
def test_100m_train_step_compiles_for_v5e_8():
    """The released-size model's step at its config's defaults (data=8, the recipe's 65,536 cells
    in 1,024 micro-batches, remat full, bf16, the Pallas kernels per chip), smallest bucket,
    default optimisation level, on v5e-8 (compile times: docs/speed.md)."""
    config = scfoundation_100m.get_config()
    topology = plan.parse_topology("v5e-8")
    start = time.perf_counter()
    (row,) = plan.plan(config, plan.topology_devices(topology), topology.chip, buckets=(512,))
    assert time.perf_counter() - start < 600
    assert not row.error, row.error
    assert row.fits and row.headroom > 0.2 and row.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    assert row.model_flops > row.xla_flops  # XLA counts the layer and micro-batch loops once


@pytest.mark.slow
@pytest.mark.heavy
def test_gpu_benchmark_runs_its_cpu_path(tmp_path):
    """bench_gpu.sh --cpu: the same script and table on tiny configs (16 cells to annotate, so
    the batch of 64 is 16)."""
    output = tmp_path / "bench.md"
    result = subprocess.run(["bash", "benchmarks/bench_gpu.sh", "--cpu", str(output)],
                            cwd=plan.__file__.rsplit("/scfm_jax/", 1)[0], capture_output=True,
                            text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in output.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| task")]
    assert [(r[0].split()[0], int(r[1])) for r in rows] == [
        ("train", 32), ("embed", 1), ("embed", 64), ("embed", 256), ("scMulan", 1), ("scMulan", 16)]
    assert all(float(r[2]) > 0 for r in rows)
    assert all(0 < float(r[4].strip(" %")) <= 100 for r in rows[:4])


def test_large_configs_train_on_the_released_recipes_effective_batch():
    """scFoundation's recipe (training.batch_size=128 per Lightning DDP process, 64 one-GPU nodes,
    accumulate_grad_batches=8) steps the optimiser every 128 x 64 x 8 cells; the 100M and 1B
    defaults pass them in micro-batches of 64 cells (8 per v5e-8 chip) with full remat."""
    from scfm_jax.configs import scfoundation_1b

    for module in (scfoundation_100m, scfoundation_1b):
        config = module.get_config()
        assert config.data.global_batch_size == 128 * 64 * 8
        assert config.data.global_batch_size // config.train.grad_accum_steps == 64
        assert config.model.remat_policy == "full"
