"""The device mesh and how arrays are laid out on it.

The mesh has three axes, `data`, `fsdp` and `tensor`, sized by `config.mesh` (-1 fills the rest).
Parameters carry logical axis names; the config's one rules table maps them onto mesh axes, so
changing the parallelism is a config edit. Every array of the train state lives on the global
mesh (replicated leaves get an empty PartitionSpec), which multi-host Orbax saves require.
"""
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_SPEC = PartitionSpec(("data", "fsdp"))  # the batch dimension is split over data and fsdp


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes for `num_devices`, with one -1 filling what the others leave."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(mesh_config)}")
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {dict(mesh_config)}: {num_devices} devices are not "
                             f"divisible by the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available; set one axis to -1 to fill")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: every device of every process).

    Axes are Auto so `with_sharding_constraint` on logical names works inside the model.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config, len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config) -> tuple[tuple[str, object], ...]:
    """The config's rules table as the tuple Flax expects (ConfigDict stores lists)."""
    rules = []
    for name, target in config.logical_axis_rules:
        if isinstance(target, list):
            target = tuple(target)
        rules.append((name, target))
    return tuple(rules)


def fit_spec(spec: PartitionSpec | None, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes that do not divide their dimension dropped (that dimension is
    then replicated), since jit needs even shards: scMulan's 2,222-token vocabulary on tensor=4,
    say."""
    entries = tuple(spec or ()) + (None,) * (len(shape) - len(tuple(spec or ())))
    fitted = []
    for size, axes in zip(shape, entries):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        shards = math.prod(mesh.shape[name] for name in names)
        fitted.append(axes if names and size % shards == 0 else None)
    return PartitionSpec(*fitted)


def state_shardings(abstract_state, mesh: Mesh, rules):
    """NamedShardings for a pytree of nnx Variables / arrays under the logical rules.

    Leaves that carry no logical names (optimizer counters, the step, the RNG key) are replicated.
    """
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh)),
        specs, abstract_state, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows split over (data, fsdp); the other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble the global batch from this process's rows (every process passes its own)."""
    out = {}
    for name, local in local_batch.items():
        sharding = batch_sharding(mesh, local.ndim)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def check_batch_divisible(global_batch_size: int, mesh: Mesh, grad_accum_steps: int) -> None:
    """Refuse batch sizes the mesh cannot split evenly, before anything is compiled."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = global_batch_size // max(grad_accum_steps, 1)
    if global_batch_size % max(grad_accum_steps, 1) or micro % shards:
        raise ValueError(
            f"config.data.global_batch_size={global_batch_size} with "
            f"config.train.grad_accum_steps={grad_accum_steps} gives micro-batches of "
            f"{global_batch_size / max(grad_accum_steps, 1):g} cells, which must be a multiple of "
            f"data x fsdp = {shards} devices")
    if global_batch_size % jax.process_count():
        raise ValueError(f"config.data.global_batch_size={global_batch_size} must be divisible by "
                         f"the number of processes ({jax.process_count()})")
