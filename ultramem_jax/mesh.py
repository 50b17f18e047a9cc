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


def memory_layout(layout_cfg: dict, mesh, rules, model_cfg, batch_size: int, min_col_width: int = 1):
    """Validates the ``memory_layout`` config against the mesh and the shapes.

    Returns the ``lookup.MemoryLayout`` (None without memory layers) and the rules with the value table's
    logical axes (value_rows, value_dim) mapped to the layout's axes, so parameters are created where the
    lookup expects them.  Problems raise UsageError naming the key.
    """
    from ultramem_jax.lookup import MemoryLayout

    unknown = set(layout_cfg) - {"rows", "cols"}
    if unknown:
        raise UsageError(f"memory_layout.{sorted(unknown)[0]}: unknown key (known: rows, cols)")
    axes = {}
    for key in ("rows", "cols"):
        val = layout_cfg.get(key) or []
        val = [val] if isinstance(val, str) else list(val)
        for a in val:
            if a not in mesh.axis_names:
                raise UsageError(f"memory_layout.{key}: {a!r} is not a mesh axis ({', '.join(mesh.axis_names)})")
        axes[key] = tuple(val)
    if set(axes["rows"]) & set(axes["cols"]):
        raise UsageError("memory_layout: an axis cannot split both rows and cols")
    rules = dict(rules)
    rules[sh.VALUE_ROWS] = axes["rows"] or None
    rules[sh.VALUE_DIM] = axes["cols"] or None
    token_axes = rules[BATCH] if isinstance(rules[BATCH], tuple) else ((rules[BATCH],) if rules[BATCH] else ())
    n_tok = math.prod(mesh.shape[a] for a in token_axes)
    if batch_size % n_tok:
        raise UsageError(f"batch_size={batch_size} does not split over the {n_tok} token shards {token_axes}")
    mem = model_cfg.resolved_memory
    if mem is None:
        return None, list(rules.items())
    n_rows = math.prod(mesh.shape[a] for a in axes["rows"])
    n_cols = math.prod(mesh.shape[a] for a in axes["cols"])
    if mem.table_rows % n_rows:  # V1: a layer's table; V2 and Memory+: the one table every layer shares
        raise UsageError(f"memory_layout.rows: the {mem.table_rows} value rows do not split evenly over "
                         f"{n_rows} shards {axes['rows']}")
    if mem.value_dim % n_cols:
        raise UsageError(f"memory_layout.cols: value_dim={mem.value_dim} does not split evenly over "
                         f"{n_cols} shards {axes['cols']}")
    if mem.is_v2 and mem.pre_value_dim % n_cols:  # P's columns split with V's
        raise UsageError(f"memory_layout.cols: pre_value_dim={mem.pre_value_dim} does not split evenly over "
                         f"{n_cols} shards {axes['cols']}")
    d_loc, core_w = mem.value_dim // n_cols, mem.value_dim // mem.cores
    if n_cols > 1 and core_w % d_loc and d_loc % core_w:
        raise UsageError(f"memory_layout.cols: a column slice of {d_loc} straddles the MCS core slices of "
                         f"{core_w} (cores={mem.cores}); use a shard count that divides or is divided by cores")
    if n_cols > 1 and d_loc < min_col_width:
        raise UsageError(f"memory_layout.cols: a column slice of {d_loc} is narrower than the {min_col_width} "
                         "the lookup kernel needs; use fewer column shards")
    fix = lambda v: tuple(v) if isinstance(v, tuple) else v  # noqa: E731
    rules = [(k, fix(v[0] if isinstance(v, tuple) and len(v) == 1 else v)) for k, v in rules.items()]
    return MemoryLayout(axes["rows"], axes["cols"], token_axes), rules
