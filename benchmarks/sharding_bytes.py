"""Bytes each memory-lookup layout puts on the wire per token, read from compiled HLO, next to the formula.

    ULTRAMEM_CPU_DEVICES=8 python benchmarks/sharding_bytes.py [--tokens 512]

Uses the UltraMem-151M-x12 memory shapes (D=768, D_v=384, E=4, H·m=2·64, h=2 cores); the table height does not
change the collectives, so a small N keeps compile time low.  Runs on fake CPU devices: these are compiled
collectives, not timings.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import jax

if os.environ.get("ULTRAMEM_CPU_DEVICES"):
    jax.config.update("jax_num_cpu_devices", int(os.environ["ULTRAMEM_CPU_DEVICES"]))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from ultramem_jax import MemoryConfig, ModelConfig, lookup  # noqa: E402
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout  # noqa: E402
from ultramem_jax.platforms import skip_absent_tpu  # noqa: E402

skip_absent_tpu()

D, DV, E, K, C = 768, 384, 4, 128, 2
BYTES = {"f32": 4, "s32": 4, "bf16": 2, "pred": 1}


def collectives(hlo):
    out = []
    for shape, op in re.findall(r"=\s*(\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", hlo):
        m = re.match(r"(\w+)\[([\d,]*)\]", shape)
        n = int(np.prod([int(x) for x in m.group(2).split(",") if x])) if m.group(2) else 1
        out.append((op, m.group(0), n * BYTES[m.group(1)]))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=512, help="global tokens in the batch")
    args = p.parse_args()
    T = args.tokens
    cases = [("replicated", {"data": 2, "fsdp": 1, "tensor": 4}, {}),
             ("number_wise (rows/tensor)", {"data": 2, "fsdp": 1, "tensor": 4}, {"rows": ["tensor"]}),
             ("dimension_wise (cols/tensor)", {"data": 2, "fsdp": 1, "tensor": 4}, {"cols": ["tensor"]}),
             ("hybrid (rows/fsdp, cols/tensor)", {"data": 1, "fsdp": 2, "tensor": 4}, {"rows": ["fsdp"], "cols": ["tensor"]}),
             ("number_wise over token axes (rows/data+fsdp)", {"data": 2, "fsdp": 4, "tensor": 1}, {"rows": ["data", "fsdp"]})]
    print(f"UltraMem-151M memory layer: D={D}, D_v={DV}, E={E}, K=H·m={K}, cores={C}, {T} tokens, 8 devices, f32\n")
    print("| layout | mesh | collective (forward) | per device | bytes / local token | formula |")
    print("|---|---|---|---|---|---|")
    for name, mesh_cfg, lay in cases:
        mesh = make_mesh(mesh_cfg)
        rules = logical_rules([], mesh)
        cfg = ModelConfig(vocab_size=16, d_model=D, num_layers=2, num_heads=12,
                          memory=MemoryConfig(num_keys=64, key_dim=192, value_dim=DV, topk=64, cores=C),
                          memory_placement="0:1")
        layout, rules = memory_layout(lay, mesh, rules, cfg, 8)
        r = dict(rules)
        tok = batch_sharding(mesh, rules).spec[0]
        N = 64 * 64
        args_ = [jax.ShapeDtypeStruct((N, DV), jnp.float32, sharding=NamedSharding(mesh, P(r["value_rows"], r["value_dim"]))),
                 jax.ShapeDtypeStruct((E, DV, D), jnp.float32, sharding=NamedSharding(mesh, P(None, r["value_dim"], None))),
                 jax.ShapeDtypeStruct((T, K), jnp.int32, sharding=NamedSharding(mesh, P(tok, None))),
                 jax.ShapeDtypeStruct((T, K, C), jnp.float32, sharding=NamedSharding(mesh, P(tok, None, None)))]
        fwd = lambda v, w, i, s: lookup.memory_lookup(layout, v, w, i, s, N, E)  # noqa: E731
        with jax.set_mesh(mesh):
            hlo = jax.jit(fwd).lower(*args_).compile().as_text()
        n_tok_shards = int(np.prod([mesh.shape[a] for a in layout.token_axes])) if layout else 1
        t_local = T // n_tok_shards
        group = [a for a in (layout.token_axes if layout else ()) if a in layout.row_axes + layout.col_axes]
        p_grp = int(np.prod([mesh.shape[a] for a in group])) if group else 1
        n_cols = int(np.prod([mesh.shape[a] for a in layout.col_axes])) if layout and layout.col_axes else 1
        c_loc = max(1, C // n_cols) if not (set(group) & set(layout.col_axes if layout else ())) else C
        found = collectives(hlo)
        if not found:
            print(f"| {name} | {mesh_cfg} | none | 0 | 0 | 0 |")
        for op, shape, nbytes in found:
            if op == "all-gather":  # each device contributes 1/p_grp of the result
                per_tok, formula = nbytes / p_grp / t_local, (f"K·4 = {K * 4}" if shape.startswith("s32")
                                                              else f"K·C_loc·4 = {K * c_loc * 4}")
            elif op == "reduce-scatter":
                per_tok, formula = nbytes * p_grp / (t_local * p_grp), f"D·4 = {D * 4}"
            else:
                per_tok, formula = nbytes / t_local, f"D·4 = {D * 4}"
            print(f"| {name} | {mesh_cfg} | {op} {shape} | {nbytes:,} B | {per_tok:,.0f} | {formula} |")

    # for contrast: the same row-sharded table, left to XLA's auto-partitioner (no shard_map)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    N = 64 * 64
    shard = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    args_ = [jax.ShapeDtypeStruct((N, DV), jnp.float32, sharding=shard("tensor", None)),
             jax.ShapeDtypeStruct((E, DV, D), jnp.float32, sharding=shard()),
             jax.ShapeDtypeStruct((T, K), jnp.int32, sharding=shard("data", None)),
             jax.ShapeDtypeStruct((T, K, C), jnp.float32, sharding=shard("data", None, None))]
    auto = jax.jit(lambda v, w, i, s: lookup.local_lookup(v, w, i, s, N, E), out_shardings=shard("data", None))
    with jax.set_mesh(mesh):
        hlo = auto.lower(*args_).compile().as_text()
    for op, shape, nbytes in collectives(hlo):
        print(f"| XLA auto-partitioned gather (rows/tensor) | {{'data': 2, 'tensor': 4}} | {op} {shape} | "
              f"{nbytes:,} B | {nbytes / (T // 2):,.0f} | (not minimal) |")


if __name__ == "__main__":
    main()
