"""The device mesh and how arrays are laid out on it.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by `config.mesh` (-1 fills the rest).
Parameters and batches carry logical axis names; the config's one rules table
(`config.logical_axis_rules`) maps them onto mesh axes, so changing the parallelism is a config
edit: the batch dimension goes where the `batch` rule says. Every array of the train state lives
on the global mesh (replicated leaves get an empty PartitionSpec), which multi-host Orbax saves
require.
"""
import logging
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from scfm_jax.errors import UsageError
from scfm_jax.models import layers

MESH_AXES = ("data", "fsdp", "tensor")
logger = logging.getLogger(__name__)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes for `num_devices`, with one -1 filling what the others leave."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UsageError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise UsageError(f"config.mesh: axis sizes must be positive or -1, got {dict(mesh_config)}")
    if -1 in sizes:
        if num_devices % fixed:
            raise UsageError(f"config.mesh {dict(mesh_config)}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise UsageError(f"config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available; set one axis to -1 to fill")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process), laid out along the
    physical axes of their slice: real devices and libtpu's compile-only topology devices alike
    (`jax.make_mesh` reads their coordinates), so the plan compiles the layout training runs on.

    Axes are Auto so `with_sharding_constraint` on logical names works inside the model.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_rules(config) -> tuple[tuple[str, object], ...]:
    """The config's rules table as the tuple Flax expects (ConfigDict stores lists)."""
    rules = []
    for name, target in config.logical_axis_rules:
        if isinstance(target, list):
            target = tuple(target)
        rules.append((name, target))
    return tuple(rules)


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def fit_spec(spec: PartitionSpec | None, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes that do not divide their dimension dropped (that dimension is
    then replicated), since jit needs even shards: scMulan's 2,222-token vocabulary on tensor=4,
    say."""
    entries = tuple(spec or ()) + (None,) * (len(shape) - len(tuple(spec or ())))
    fitted = []
    for size, entry in zip(shape, entries):
        shards = math.prod(mesh.shape[name] for name in _axes(entry))
        fitted.append(entry if _axes(entry) and size % shards == 0 else None)
    return PartitionSpec(*fitted)


def _logical_specs(abstract_state, rules):
    with nnx.logical_axis_rules(rules):
        return nnx.get_partition_spec(abstract_state)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec) or x is None


def state_shardings(abstract_state, mesh: Mesh, rules):
    """NamedShardings for a pytree of nnx Variables / arrays under the logical rules.

    Leaves that carry no logical names (optimizer counters, the step, the RNG key) are replicated.
    """
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
        _logical_specs(abstract_state, rules), abstract_state, is_leaf=_is_spec)


def _path_name(path) -> str:
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    return ".".join(name for name in names if name != "value")


def check_replication(abstract_params, mesh: Mesh, rules, tolerance: float) -> list[str]:
    """Names (once, in the log) the parameter dimensions left whole because their mesh axes do not
    divide them, and fails when those parameters hold more than `tolerance` of the parameter bytes
    (MaxText's sharding tolerance: a bad mesh/rules pair silently replicating the model).

    Returns the report lines.
    """
    lines, replicated, total = [], 0, 0
    flat_specs = jax.tree.leaves_with_path(_logical_specs(abstract_params, rules), is_leaf=_is_spec)
    for (path, spec), leaf in zip(flat_specs, jax.tree.leaves(abstract_params)):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        entries = tuple(spec or ()) + (None,) * (len(leaf.shape) - len(tuple(spec or ())))
        dropped = [(dim, size, entry) for dim, (size, entry, kept) in enumerate(
            zip(leaf.shape, entries, fit_spec(spec, leaf.shape, mesh))) if _axes(entry) and not kept]
        if dropped:
            replicated += nbytes
            where = ", ".join(f"dim {dim} ({size}) not divisible by {'x'.join(_axes(entry))}="
                              f"{math.prod(mesh.shape[a] for a in _axes(entry))}"
                              for dim, size, entry in dropped)
            lines.append(f"{_path_name(path)}: {where}")
    if lines:
        logger.warning("replicated because the mesh does not divide them (%.1f%% of parameter "
                       "bytes):\n  %s", 100 * replicated / max(total, 1), "\n  ".join(lines))
    if total and replicated / total > tolerance:
        raise UsageError(
            f"{replicated / total:.1%} of the parameter bytes would be replicated because mesh "
            f"{dict(mesh.shape)} does not divide their dimensions (config.sharding_tolerance="
            f"{tolerance}): {'; '.join(lines[:4])}; change config.mesh or "
            "config.logical_axis_rules")
    return lines


def batch_spec(rules, ndim: int) -> PartitionSpec:
    """Rows split as the `batch` rule says; the other dimensions whole."""
    return nn.logical_to_mesh_axes((layers.BATCH,) + (None,) * (ndim - 1), rules)


def batch_sharding(mesh: Mesh, ndim: int, rules) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(rules, ndim))


def batch_shards(mesh: Mesh, rules) -> int:
    """How many pieces the batch dimension is split into."""
    return math.prod(mesh.shape[axis] for axis in _axes(batch_spec(rules, 1)[0]))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows (every process passes its own)."""
    out = {}
    for name, local in local_batch.items():
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, local.ndim, rules), local, global_shape)
    return out


def check_batch_divisible(global_batch_size: int, mesh: Mesh, grad_accum_steps: int,
                          rules) -> None:
    """Refuse batch sizes the mesh cannot split evenly, before anything is compiled."""
    shards = batch_shards(mesh, rules)
    micro = global_batch_size // max(grad_accum_steps, 1)
    if global_batch_size % max(grad_accum_steps, 1) or micro % shards:
        axes = " x ".join(_axes(batch_spec(rules, 1)[0])) or "no mesh axis"
        raise UsageError(
            f"config.data.global_batch_size={global_batch_size} with "
            f"config.train.grad_accum_steps={grad_accum_steps} gives micro-batches of "
            f"{global_batch_size / max(grad_accum_steps, 1):g} cells, which must be a multiple of "
            f"{axes} = {shards} devices (the `batch` rule of config.logical_axis_rules)")
    if global_batch_size % jax.process_count():
        raise UsageError(f"config.data.global_batch_size={global_batch_size} must be divisible by "
                         f"the number of processes ({jax.process_count()})")


def join_processes(args) -> None:
    """From a command's parsed flags (`num_cpu_devices`, `coordinator_address`, `num_processes`,
    `process_id`, `auto_distributed`): set the CPU device count and join a multi-process run,
    before JAX touches a device."""
    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
    if args.coordinator_address:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.auto_distributed:
        jax.distributed.initialize()
