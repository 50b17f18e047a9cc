"""Device mesh and logical → mesh axis rules from the run config (MaxText vocabulary: data, fsdp, tensor)."""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ultramem_jax import sharding as sh
from ultramem_jax.errors import UsageError

BATCH = "batch"  # logical name of the batch dimension of activations


def make_mesh(mesh_cfg: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """``{"data": -1, "fsdp": 1, "tensor": 1}`` → a mesh over ``devices``; one -1 takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    names, sizes = list(mesh_cfg), list(mesh_cfg.values())
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UsageError(f"mesh: {mesh_cfg} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UsageError(f"mesh: {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                         f"this machine has {len(devices)}")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names), devices=devices)


def logical_rules(rules_cfg: list, mesh: jax.sharding.Mesh) -> list[tuple[str, object]]:
    """Every logical axis gets a rule (replicated unless the config maps it); ``batch`` defaults to all
    data-parallel axes present in the mesh."""
    rules = {name: None for name in sh.LOGICAL_AXES}
    rules[BATCH] = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
    for entry in rules_cfg:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UsageError(f"logical_axis_rules: entry {entry!r} is not [logical_name, mesh_axes]")
        name, axes = entry
        if name not in rules:
            raise UsageError(f"logical_axis_rules: unknown logical axis {name!r} (known: {', '.join(rules)})")
        axes_t = tuple(axes) if isinstance(axes, (list, tuple)) else ((axes,) if axes else ())
        for a in axes_t:
            if a not in mesh.axis_names:
                raise UsageError(f"logical_axis_rules: {name!r} maps to {a!r}, not a mesh axis "
                                 f"({', '.join(mesh.axis_names)})")
        rules[name] = axes_t if len(axes_t) > 1 else (axes_t[0] if axes_t else None)
    return list(rules.items())


def batch_sharding(mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, P(dict(rules)[BATCH], None))
