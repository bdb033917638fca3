"""`scfm-jax plan`: compile a config's train or embedding step for a TPU slice without the hardware,
and print what each chip needs (HBM, FLOPs, collectives) and the step time a roofline implies.

  scfm-jax plan --config configs/scfoundation_100m.py --topology v5e-8 [--step train|embed]
      [--sweep [--remat full]] [--bucket 512] [--largest-collectives 3] [--config.mesh.fsdp=8 ...]

Deviceless ahead-of-time compilation, as MaxText's `train_compile.py`: with the `libtpu` wheel
installed, `jax.experimental.topologies.get_topology_desc` gives compile-only devices of a named
slice; the step is jitted over a mesh of them with the train loop's own shardings, lowered on
abstract arguments and compiled by the real TPU compiler, whose memory and cost analyses are per
chip. A program that does not fit fails to compile with the TPU's RESOURCE_EXHAUSTED message.
`scfm-jax train --dry-run` prints the same table for the devices at hand.
"""
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from scfm_jax.errors import MissingDependency, UsageError
from scfm_jax.train import chips, config_checks, partitioning
from scfm_jax.train.chips import GiB, Chip


# Slice shapes by chip count. v5e and v6e slices are named by chips (v5e-8: 8 chips, 2x4); v4 and
# v5p by TensorCores, two per chip, which the compiler joins as one "megacore" device (v5p-8:
# 4 chips, 2x2x1). The shapes are the ones Cloud TPU offers (the pages above).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_TOPOLOGY_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}
REMAT_POLICIES = ("none", "dots", "full")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                 # what the user typed
    generation: str           # key of chips.TPUS
    topology_name: str        # what libtpu accepts, e.g. v5e:2x4
    num_chips: int

    @property
    def chip(self) -> Chip:
        return chips.TPUS[self.generation]


def parse_topology(name: str) -> Topology:
    """`v5e-8` / `v5p-8` / `v4-16` / `v6e-64` (Cloud TPU names) or `v5e:2x4` (libtpu's)."""
    text = name.strip().lower()
    if match := re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text):
        generation, count = match.group(1), int(match.group(2))
        chips = count // 2 if generation in ("v4", "v5p") else count
        shapes = _SHAPES_3D if generation in ("v4", "v5p") else _SHAPES_2D
        if chips not in shapes or (generation in ("v4", "v5p") and count % 2):
            sizes = sorted(n * 2 if generation in ("v4", "v5p") else n for n in shapes)
            raise UsageError(f"--topology {name}: no {generation} slice of that size; choose one of "
                             + ", ".join(f"{generation}-{n}" for n in sizes))
        return Topology(name, generation, f"{_TOPOLOGY_PREFIX[generation]}:{shapes[chips]}", chips)
    if match := re.fullmatch(r"(v4|v5e|v5|v5p|v6e):(\d+(?:x\d+)+)", text):
        prefix = "v5" if match.group(1) == "v5p" else match.group(1)
        generation = {"v5": "v5p"}.get(prefix, prefix)
        chips = math.prod(int(d) for d in match.group(2).split("x"))
        return Topology(name, generation, f"{prefix}:{match.group(2)}", chips)
    raise UsageError(f"--topology {name!r}: expected a Cloud TPU slice name such as v5e-8, v5p-8, "
                     f"v4-16, v6e-64, or a libtpu topology such as v5e:2x4 or v5:2x2x1")


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


LIBTPU_MISSING = ("planning for TPU needs the libtpu wheel (the TPU compiler; no TPU required): "
                  'pip install -e ".[tpu]"')


def topology_devices(topology: Topology) -> list:
    """Compile-only devices of the slice, in the order of its physical layout."""
    if not libtpu_available():
        raise MissingDependency(LIBTPU_MISSING)
    from jax.experimental import topologies

    # Without TPUs libtpu would otherwise ask the GCE metadata server for its slice; and a
    # compile-only client may share libtpu with a process that holds the chips (a training run).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    options = {"chip_config_name": "megacore"} if topology.generation in ("v4", "v5p") else {}
    if topology.num_chips < 4:  # libtpu's default host is 2x2 chips
        dims = [int(d) for d in topology.topology_name.split(":")[1].split("x")]
        options["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    return list(topologies.get_topology_desc(topology.topology_name, "tpu", **options).devices)


# ------------------------------------------------------------------------------------ analysis

@dataclasses.dataclass
class PlanRow:
    step: str
    bucket: int
    global_batch: int
    remat: str
    mesh: dict
    compile_seconds: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    model_flops: float = 0.0        # per chip, loop-free count
    xla_flops: float = 0.0          # per chip, XLA's count (loop bodies once)
    xla_bytes: float = 0.0          # per chip, bytes accessed
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> (count, bytes)
    largest_collectives: list = dataclasses.field(default_factory=list)  # collective_ops items
    heaviest_ops: list = dataclasses.field(default_factory=list)  # heaviest_ops items
    hbm_bytes: float | None = None
    peak_flops: float | None = None
    hbm_bandwidth: float | None = None
    error: str = ""                 # the compiler's message when it refused (e.g. out of HBM)

    @property
    def total_bytes(self) -> int:
        """Live HBM of the step: arguments, outputs not aliased to donated arguments, temporaries
        and the program."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes \
            + self.code_bytes

    @property
    def fits(self) -> bool | None:
        if self.error:
            return False
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    @property
    def headroom(self) -> float | None:
        return None if self.hbm_bytes is None or self.error else 1 - self.total_bytes / self.hbm_bytes

    @property
    def loop_scale(self) -> float:
        """How often the step runs its loop bodies (layers, chunks, micro-batches) on average,
        estimated as model FLOPs / XLA FLOPs: XLA's cost analysis counts a loop body once."""
        return max(1.0, self.model_flops / self.xla_flops) if self.xla_flops else 1.0

    @property
    def bytes_estimate(self) -> float:
        """HBM traffic of the step: XLA's bytes accessed, loop bodies scaled as their FLOPs."""
        return self.xla_bytes * self.loop_scale

    @property
    def roofline_seconds(self) -> float | None:
        """max(FLOPs / peak, bytes / HBM bandwidth): the step cannot run faster than this."""
        if self.peak_flops is None or self.error:
            return None
        flops = max(self.model_flops, self.xla_flops)
        return max(flops / self.peak_flops, self.bytes_estimate / self.hbm_bandwidth)

    @property
    def roofline_mfu(self) -> float | None:
        seconds = self.roofline_seconds
        return None if not seconds else self.model_flops / seconds / self.peak_flops


def _bytes_of(dtype: str, dims: str) -> int:
    itemsize = 1 if dtype == "pred" else max(int(re.sub(r"\D", "", dtype)[:2] or 8) // 8, 1)
    return itemsize * math.prod(int(d) for d in dims.split(",") if d)


def collective_ops(hlo_text: str):
    """The collectives of an optimised HLO module, one (kind, result bytes, result shape, JAX
    op_name) per op; async pairs at their `-start`, each op once (also inside loop bodies)."""
    pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if not match or "-done(" in line:
            continue
        shapes = re.findall(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]", match.group(1))
        if match.group(3):
            # an async start's value is (operands..., results..., [scalar contexts]): the results
            arrays = [shape for shape in shapes if shape[1]]
            shapes = arrays[len(arrays) // 2:] if len(arrays) >= 2 else arrays
        op_name = re.search(r'op_name="([^"]*)"', line)
        yield (match.group(2), sum(_bytes_of(*shape) for shape in shapes),
               match.group(1).strip(), op_name.group(1) if op_name else "")


def collective_bytes(hlo_text: str) -> dict[str, tuple[int, int]]:
    """Collectives in an optimised HLO module: kind -> (ops, bytes of their results)."""
    totals: dict[str, list[int]] = {}
    for kind, size, _, _ in collective_ops(hlo_text):
        entry = totals.setdefault(kind, [0, 0])
        entry[0] += 1
        entry[1] += size
    return {kind: (count, size) for kind, (count, size) in totals.items()}


def largest_collectives(hlo_text: str, n: int = 5) -> list[tuple[str, int, str, str]]:
    """The `n` collectives with the largest results: where a replicated tensor or a gathered
    activation hides (op_name names the JAX code that asked for it)."""
    return sorted(collective_ops(hlo_text), key=lambda op: -op[1])[:n]


_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_NOT_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call",
                "conditional", "after-all", "partition-id", "replica-id"}


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
    """{computation: [(name, result type, opcode, rest of line)]} and the entry's name."""
    computations, current, entry = {}, None, ""
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current and (match := _INSTRUCTION.match(line)):
            computations[current].append(match.groups())
    return computations, entry


def _trip_count(rest: str, condition: list[tuple]) -> int:
    """A while loop's trip count: the compiler's `known_trip_count`, else the bound its
    condition compares the counter with (JAX's loops count from 0 in steps of 1)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    if known:
        return int(known.group(1))
    bounds = [int(b) for _, _, opcode, args in condition if opcode == "constant"
              for b in re.findall(r"^(\d+)\)", args)]
    return max(bounds, default=1)


def heaviest_ops(hlo_text: str, n: int = 10) -> list[tuple[float, int, str, str, str]]:
    """The `n` instructions of an optimised HLO module that move the most bytes per step: (bytes
    of results and operands x the times it runs, the times it runs, opcode (a fusion with its
    kind), result type, JAX op_name). The times an instruction runs are the trip counts of the
    while loops around it (layers, micro-batches, a collective matmul's steps), which XLA's cost
    analysis does not weigh in: where the step's memory traffic goes, read from the program.
    A fusion counts its operands whole, so one that updates a slice of a large buffer in place
    (a scan stacking per-layer outputs) is counted as if it read and wrote all of it, and every
    branch of a conditional as if it ran."""
    computations, entry = _computations(hlo_text)
    types = {name: result for body in computations.values() for name, result, _, _ in body}
    sizes = {name: sum(_bytes_of(*shape) for shape in re.findall(
        r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]", result)) for name, result in types.items()}
    runs: dict[str, int] = {}

    def visit(computation: str, times: int):
        runs[computation] = runs.get(computation, 0) + times
        for _, _, opcode, rest in computations.get(computation, ()):
            if opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                condition = re.search(r"condition=%([\w.\-]+)", rest).group(1)
                visit(body, times * _trip_count(rest, computations.get(condition, [])))
            elif opcode in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply=|_computations?=\{?|, )%([\w.\-]+)",
                                         rest):
                    if callee in computations:
                        visit(callee, times)

    visit(entry, 1)
    rows = []
    for computation, times in runs.items():
        for name, result, opcode, rest in computations[computation]:
            if opcode in _NOT_TRAFFIC:
                continue
            operands = rest.split("), ")[0]
            moved = sizes[name] + sum(sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)",
                                                                          operands))
            kind = re.search(r"kind=(\w+)", rest)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            rows.append((float(moved * times), times, opcode + (f":{kind.group(1)}" if kind else ""),
                         re.sub(r"\{[^}]*\}", "", result), op_name.group(1) if op_name else ""))
    return sorted(rows, key=lambda row: -row[0])[:n]


def analyse(compiled, row: PlanRow) -> PlanRow:
    memory = compiled.memory_analysis()
    row.argument_bytes = int(memory.argument_size_in_bytes)
    row.output_bytes = int(memory.output_size_in_bytes)
    row.alias_bytes = int(memory.alias_size_in_bytes)
    row.temp_bytes = int(memory.temp_size_in_bytes)
    row.code_bytes = int(memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    row.xla_flops = float(cost.get("flops", 0.0))
    row.xla_bytes = float(cost.get("bytes accessed", 0.0))
    text = compiled.as_text()
    row.collectives = collective_bytes(text)
    row.largest_collectives = largest_collectives(text)
    row.heaviest_ops = heaviest_ops(text, 20)
    return row


# ---------------------------------------------------------------------------------- the steps

def abstract_batch(config: ml_collections.ConfigDict, mesh, bucket: int, global_batch: int,
                   pipeline_class=None) -> dict:
    """The train loop's device batch as sharded shapes: the pipeline's schema
    (`data.pipeline.batch_schema`, `pipeline_class` default `Pipeline`) for the config's obs keys,
    host-only fields left out, padded to `bucket`."""
    from scfm_jax.data.pipeline import batch_schema

    rules = partitioning.logical_rules(config)
    schema = batch_schema(pipeline_class, tuple(config.data.get("obs_keys", ())))
    batch = {}
    for name, field in schema.items():
        if not field.on_host:
            shape = field.shape(global_batch, bucket)
            batch[name] = jax.ShapeDtypeStruct(
                shape, jnp.dtype(field.dtype),
                sharding=partitioning.batch_sharding(mesh, len(shape), rules))
    return batch


def plan_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with the fields a store would fill in set from the config itself, so a plan
    needs no store (the model's objective says how: `Objective.plan_config`)."""
    from scfm_jax.objectives import get_objective

    objective = get_objective(config.model.name)
    if objective.plan_config is None:
        raise UsageError(f"model {config.model.name!r} cannot be planned without a store: its "
                         "objective has no plan_config")
    return objective.plan_config(config)


def embed_step(graphdef, objective, objective_config):
    """(params, buffers, batch) -> cell embeddings: the model's `Objective.embed`, as store-scale
    inference runs it."""
    def embed(params, buffers, batch):
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, buffers))
        return objective.embed(model, batch, objective_config)
    return embed


def compile_step(trainer, step: str, bucket: int, global_batch: int):
    """(compiled executable, abstract batch) of the train or embed step for one bucket."""
    batch = abstract_batch(trainer.config, trainer.mesh, bucket, global_batch)
    state = trainer.abstract_sharded_state()
    if step == "train":
        return trainer.compile_train_step(state, batch), batch
    if trainer.objective.embed is None:
        raise UsageError(f"--step embed: model {trainer.objective.name!r} has no cell embedding")
    jitted = jax.jit(embed_step(trainer.graphdef, trainer.objective, trainer.config.objective),
                     in_shardings=(trainer.state_sharding.params, trainer.state_sharding.buffers,
                                   {k: v.sharding for k, v in batch.items()}))
    with jax.set_mesh(trainer.mesh), nnx.logical_axis_rules(trainer.rules):
        return jitted.lower(state.params, state.buffers, batch).compile(), batch


def plan_bucket(config, devices, chip: Chip | None, *, step: str = "train", bucket: int,
                global_batch: int | None = None) -> PlanRow:
    """Compile one (step, bucket) of `config` for `devices` and analyse it."""
    from scfm_jax.objectives import get_objective
    from scfm_jax.train.trainer import Trainer

    global_batch = int(global_batch or config.data.global_batch_size)
    mesh = partitioning.make_mesh(config.mesh, devices)
    partitioning.check_batch_divisible(global_batch, mesh, config.train.grad_accum_steps,
                                       partitioning.logical_rules(config))
    trainer = Trainer(config, get_objective(config.model.name), mesh)
    return plan_trainer_bucket(trainer, chip, step=step, bucket=bucket, global_batch=global_batch)


def plan_trainer_bucket(trainer, chip: Chip | None, *, step: str = "train", bucket: int,
                        global_batch: int) -> PlanRow:
    """Compile one (step, bucket) of a Trainer on its mesh and analyse it; a compile the chip's
    memory refuses comes back as a row with `error` set."""
    row = PlanRow(step=step, bucket=bucket, global_batch=global_batch,
                  remat=str(trainer.config.model.get("remat_policy", "none")),
                  mesh=dict(trainer.mesh.shape), compile_seconds=0.0,
                  hbm_bytes=chip.hbm_bytes if chip else None,
                  peak_flops=chip.peak_flops if chip else None,
                  hbm_bandwidth=chip.hbm_bandwidth if chip else None)
    start = time.perf_counter()
    try:
        compiled, batch = compile_step(trainer, step, bucket, global_batch)
    except Exception as error:  # the TPU compiler's verdict on memory is an answer, not a crash
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        row.compile_seconds = time.perf_counter() - start
        row.error = " ".join(str(error).split())[:400]
        return row
    row.compile_seconds = time.perf_counter() - start
    analyse(compiled, row)
    if step == "train":
        row.model_flops = trainer.model_flops(batch)
    return row


def plan(config, devices, chip: Chip | None, *, step: str = "train",
         buckets: tuple[int, ...] | None = None) -> list[PlanRow]:
    """One row per expressed-gene bucket of the config (or `buckets`)."""
    buckets = tuple(buckets or config.data.buckets)
    return [plan_bucket(config, devices, chip, step=step, bucket=int(b)) for b in buckets]


def sweep(config, devices, chip: Chip, *, step: str = "train", bucket: int | None = None,
          policies: tuple[str, ...] = REMAT_POLICIES, max_batch: int = 1 << 16,
          plan_row=None, on_row=None) -> dict:
    """Per remat policy, the largest global batch of the form smallest * 2^k (smallest: what the
    mesh and the micro-batches split) whose step fits the chip at the largest bucket:
    policy -> (batch or 0, the rows compiled).

    The search starts at the grid point nearest the config's batch and doubles while it fits, or
    halves until it fits: a 1B compile takes minutes, and the config's batch is usually close.
    `on_row(row)` is called after each compile (the CLI prints progress with it)."""
    bucket = int(bucket or max(config.data.buckets))
    mesh_shape = dict(zip(partitioning.MESH_AXES,
                          partitioning.mesh_shape(config.mesh, len(devices))))
    accum = max(int(config.train.grad_accum_steps), 1) if step == "train" else 1
    smallest = mesh_shape["data"] * mesh_shape["fsdp"] * accum
    start = max(0, round(math.log2(max(int(config.data.global_batch_size), 1) / smallest)))
    plan_row = plan_row or plan_bucket
    results = {}
    for policy in policies:
        trial = ml_collections.ConfigDict(config.to_dict())
        trial.model.remat_policy = policy
        rows = []

        def fits(k: int) -> bool:
            row = plan_row(trial, devices, chip, step=step, bucket=bucket,
                           global_batch=smallest << k)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            return bool(row.fits)

        k = min(start, int(math.log2(max(1, max_batch // smallest))))
        if fits(k):
            while (smallest << (k + 1)) <= max_batch and fits(k + 1):
                k += 1
            best = smallest << k
        else:
            while k > 0 and not fits(k - 1):
                k -= 1
            best = smallest << (k - 1) if k > 0 else 0
        results[policy] = (best, sorted(rows, key=lambda r: r.global_batch))
    return results


# ------------------------------------------------------------------------------------ printing

def _si(x, unit: str = "B") -> str:
    """1234567 -> '1.23MB': three significant figures with a decimal prefix."""
    if x is None:
        return "-"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


COLUMNS = ("step", "bucket", "batch", "remat", "mesh d,f,t", "args", "outputs", "temp", "program",
           "total",
           "HBM", "fits", "headroom", "model FLOPs", "XLA FLOPs", "XLA bytes", "bytes est.",
           "roofline", "MFU", "compile", "collectives (ops x result bytes)")


def format_rows(rows: list[PlanRow], chip: Chip | None) -> str:
    """A plain-text table, one line per row, then the chip's figures and their source."""
    table = [COLUMNS]
    for r in rows:
        mesh = ",".join(str(r.mesh[a]) for a in partitioning.MESH_AXES)
        head = (r.step, str(r.bucket), str(r.global_batch), r.remat, mesh)
        if r.error:
            table.append(head + ("does not fit: " + r.error,))
            continue
        seconds, mfu = r.roofline_seconds, r.roofline_mfu
        collectives = " ".join(f"{kind}:{n}x{_si(size)}" for kind, (n, size) in
                               sorted(r.collectives.items())) or "none"
        table.append(head + (
            _si(r.argument_bytes), _si(r.output_bytes - r.alias_bytes), _si(r.temp_bytes),
            _si(r.code_bytes), _si(r.total_bytes), _si(r.hbm_bytes),
            "-" if r.fits is None else ("yes" if r.fits else "NO"),
            "-" if r.headroom is None else f"{r.headroom:.0%}",
            _si(r.model_flops, ""), _si(r.xla_flops, ""), _si(r.xla_bytes), _si(r.bytes_estimate),
            "-" if seconds is None else f"{seconds * 1e3:.3g}ms",
            "-" if mfu is None else f"{mfu:.0%}", f"{r.compile_seconds:.0f}s", collectives))
    widths = [max(len(line[i]) for line in table if len(line) > i and len(line) == len(COLUMNS))
              for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(line, widths))) + "  " + "  ".join(line[len(widths):])
             for line in table]
    notes = ["per chip. model FLOPs: the loop-free count of the step (MFU's numerator); XLA FLOPs "
             "and bytes: the compiler's cost analysis, which counts a loop body once; bytes est.: "
             "XLA bytes x model/XLA FLOPs (loop bodies scaled as their FLOPs); outputs exclude "
             "those aliased to donated inputs; program: the compiled code; total = args + outputs "
             "+ temp + program; roofline = max(FLOPs / peak, bytes est. / HBM bandwidth), an upper "
             "bound on speed."]
    if chip is not None:
        notes.append(f"{chip.name}: {chip.hbm_bytes / GiB:.0f} GiB HBM, "
                     f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
                     f"{chip.hbm_bandwidth / 1e9:.0f} GB/s HBM bandwidth ({chip.source})")
    return "\n".join(lines + notes)


def format_largest_collectives(rows: list[PlanRow], n: int) -> str:
    """Per row, its `n` largest collectives: result bytes, shape and the JAX op behind each."""
    lines = []
    for r in rows:
        if r.error or not r.largest_collectives or n <= 0:
            continue
        lines.append(f"largest collectives, {r.step} bucket {r.bucket} batch {r.global_batch}:")
        lines += [f"  {kind} {_si(size)} {shape[:120]}  {op_name or '(no op_name)'}"
                  for kind, size, shape, op_name in r.largest_collectives[:n]]
    return "\n".join(lines)


def format_heaviest_ops(rows: list[PlanRow], n: int) -> str:
    """Per row, its `n` instructions that move the most bytes (`heaviest_ops`)."""
    lines = []
    for r in rows:
        if r.error or not r.heaviest_ops or n <= 0:
            continue
        lines.append(f"heaviest ops, {r.step} bucket {r.bucket} batch {r.global_batch} (bytes "
                     "of results and operands x runs per step):")
        lines += [f"  {_si(moved)} x{runs} {opcode} {result[:80]}  {op_name or '(no op_name)'}"
                  for moved, runs, opcode, result, op_name in r.heaviest_ops[:n]]
    return "\n".join(lines)


def print_trainer_plan(trainer, buckets, global_batch: int) -> list[PlanRow]:
    """`scfm-jax train --dry-run`: the plan of the train loop's own Trainer (its mesh over the
    devices at hand), printed."""
    chip = chips.chip_of_devices(list(trainer.mesh.devices.flat))
    rows = [plan_trainer_bucket(trainer, chip, bucket=int(b), global_batch=global_batch)
            for b in buckets]
    if jax.process_index() == 0:
        print(format_rows(rows, chip), flush=True)
    return rows


# ------------------------------------------------------------------------------------------ CLI

def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="scfm-jax plan", description=__doc__.split("\n\n")[0],
                                     epilog=config_checks.OVERRIDES_HELP)
    parser.add_argument("--topology", required=True,
                        help="TPU slice: v5e-8, v5p-8, v4-16, v6e-64 or v5e:2x4")
    parser.add_argument("--step", choices=("train", "embed"), default="train",
                        help="which step to compile (default: %(default)s)")
    parser.add_argument("--bucket", type=int, action="append",
                        help="only this expressed-gene bucket (repeatable; default: all)")
    parser.add_argument("--remat", choices=list(REMAT_POLICIES), action="append",
                        help="with --sweep: only this remat policy (repeatable; default: all)")
    parser.add_argument("--sweep", action="store_true",
                        help="largest global batch that fits, per remat policy")
    parser.add_argument("--largest-collectives", type=int, default=3,
                        help="list this many of each row's largest collectives, with the JAX op "
                             "behind each (default: %(default)s)")
    parser.add_argument("--heaviest-ops", type=int, default=0,
                        help="list this many of each row's instructions that move the most bytes "
                             "per step, loop trip counts applied (default: %(default)s)")
    return config_checks.parse_command(parser, argv)


def main(argv) -> int:
    flag_values = _parse(argv)   # an argparse namespace
    # The host's own devices only trace and lower; on a TPU VM they stay free for training.
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
    topology = parse_topology(flag_values.topology)
    if not libtpu_available():
        raise MissingDependency(LIBTPU_MISSING)
    config = plan_config(flag_values.config)
    devices = topology_devices(topology)
    chip = topology.chip
    print(f"{topology.name}: {topology.topology_name}, {len(devices)} chips "
          f"({devices[0].device_kind})", flush=True)
    if flag_values.sweep:
        bucket = (flag_values.bucket or [None])[-1]
        results = sweep(config, devices, chip, step=flag_values.step, bucket=bucket,
                        policies=tuple(flag_values.remat or REMAT_POLICIES),
                        on_row=lambda row: print(
                            f"  remat={row.remat} batch {row.global_batch}: "
                            f"{'fits' if row.fits else 'does not fit'} "
                            f"({row.compile_seconds:.0f} s to compile"
                            + (f"; roofline {row.roofline_seconds * 1e3:.3g} ms per step"
                               if row.roofline_seconds else "") + ")",
                            file=sys.stderr, flush=True))
        all_rows = [row for _, rows in results.values() for row in rows]
        print(format_rows(all_rows, chip))
        for policy, (best, _) in results.items():
            print(f"remat={policy}: largest global batch that fits: "
                  f"{best if best else 'none (the smallest does not fit)'}")
        return 0
    rows = plan(config, devices, chip, step=flag_values.step, buckets=flag_values.bucket)
    print(format_rows(rows, chip))
    for listing in (format_largest_collectives(rows, flag_values.largest_collectives),
                    format_heaviest_ops(rows, flag_values.heaviest_ops)):
        if listing:
            print(listing)
    return 0
