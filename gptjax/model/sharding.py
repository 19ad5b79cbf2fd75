"""Device mesh, the one logical-axis -> mesh-axis table, sharded params and batches, multi-host init."""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). The only place sharding policy is written down.
# Params are sharded FSDP-style on 'embed' and Megatron-style on heads / mlp / vocab; the batch is split
# over both data-parallel axes.
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "pos": None,
    "lora_rank": None,
    "length": None,
}


def maybe_initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Call jax.distributed.initialize() when launched as one process of a multi-host job.

    Explicit: ``coordinator_address`` (host:port of process 0), ``num_processes`` and ``process_id``, as
    arguments (``scripts/train.py --coordinator_address ...``) or the environment variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Detected: SLURM with several tasks, Open MPI,
    or a multi-worker Cloud TPU slice (JAX reads their variables). Single-process runs are left alone; a
    second call is a no-op.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator_address is not None:
        given = {"num_processes": num_processes, "process_id": process_id}
        for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if given[name] is None and var in env:
                given[name] = int(env[var])
        explicit = dict(coordinator_address=coordinator_address, **given)
        multi = given["num_processes"] is None or given["num_processes"] > 1
    else:
        explicit = {}
        multi = (
            int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize(**explicit)
        logging.info("multi-host: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(mesh_cfg: Any = None, devices: list | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) from a mapping like {data: 1, fsdp: -1, tensor: 1}.

    One axis may be -1: it takes the rest of the devices.
    """
    mesh_cfg = dict(mesh_cfg or {"data": 1, "fsdp": -1, "tensor": 1})
    unknown = set(mesh_cfg) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axis {sorted(unknown)}; axes are {MESH_AXES}")
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        shape = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"mesh: {shape} needs {math.prod(sizes)} devices, found {len(devices)}")
    # jax.make_mesh orders devices for the physical topology (ICI rings on TPU, NVLink islands on GPU).
    # Auto axes: GSPMD propagates shardings from the params and batch (jax.make_mesh defaults to Explicit).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=auto)


def _mesh_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(axes: tuple, shape: tuple, mesh: Mesh) -> P:
    """PartitionSpec for one array; a dim that the mesh axis does not divide is replicated."""
    spec, used = [], set()
    for name, dim in zip(axes, shape, strict=True):
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in gptjax.model.sharding.RULES")
        target = RULES[name]
        flat = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        flat = tuple(a for a in flat if a not in used and mesh.shape.get(a, 1) > 1)
        if flat and dim % _mesh_size(mesh, flat) == 0:
            spec.append(flat[0] if len(flat) == 1 else flat)
            used.update(flat)
        else:
            spec.append(None)
    return P(*spec)


def shardings_for(axes_tree: Any, shapes_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree given its logical axes and shapes (ShapeDtypeStructs or arrays)."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
    return jax.tree.map(
        lambda axes, s: NamedSharding(mesh, logical_to_spec(axes, tuple(s.shape), mesh)),
        axes_tree,
        shapes_tree,
        is_leaf=is_axes,
    )


def batch_spec(ndim: int) -> P:
    return P(RULES["batch"], *([None] * (ndim - 1)))


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.ndim(x))), batch)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax arrays split over the batch axes (multi-host aware)."""

    def put(x):
        sharding = NamedSharding(mesh, batch_spec(x.ndim))
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def context_batch_axes(mesh, batch: int) -> tuple[str, ...] | None:
    """The batch axes (``RULES['batch']``) of size > 1 of ``mesh`` (an abstract context mesh), when their
    product divides ``batch``; else None (nothing to split the batch over)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    axes = tuple(a for a in RULES["batch"] if sizes.get(a, 1) > 1)
    if not axes or batch % math.prod(sizes[a] for a in axes):
        return None
    return axes


def batch_sharded(x_B: jax.Array) -> jax.Array:
    """Pin activations to the batch split of the context mesh (``jax.set_mesh``; no-op without one).

    With FSDP the embedding table is split on 'embed' over the same mesh axis that splits the batch; left
    alone, XLA's sharding propagation resolves the token lookup by gathering the whole batch onto every
    device and splitting the activations on d_model, so every device runs every layer on the global batch.
    Pinned, the lookup's output is split by batch and FSDP gathers each layer's weights instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return x_B
    axes = context_batch_axes(mesh, x_B.shape[0])
    if axes is None:
        return x_B
    return jax.lax.with_sharding_constraint(x_B, P(axes, *([None] * (x_B.ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
