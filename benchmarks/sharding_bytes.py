"""Bytes each memory-lookup layout puts on the wire per token, read from compiled HLO, next to the formula.

    ULTRAMEM_CPU_DEVICES=8 python benchmarks/sharding_bytes.py [--tokens 512]

Uses the UltraMem-151M-x12 memory shapes (D=768, D_v=384, E=4, H·m=2·64, h=2 cores), then UltraMemV2-227M's
(pre-value table P and value table V, D_p = D_v = 192, K = 1·32, 2 cores) and Memory+-227M's (one pool,
D_v = 768, K = 2·80, gate silu(W_g x)); the table height does not change the collectives, so a small N keeps
compile time low.  Runs on fake CPU devices: these are compiled collectives, not timings.
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
    """(op, result shape, bytes) of each collective; a combined one's tuple result gives one entry per part,
    except an all-to-all's, whose parts are one exchange (summed)."""
    out = []
    for shape, op in re.findall(r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all)"
                                r"(?:-start)?\(", hlo):
        parts = []
        for m in re.finditer(r"(\w+)\[([\d,]*)\]", shape):
            n = int(np.prod([int(x) for x in m.group(2).split(",") if x])) if m.group(2) else 1
            parts.append((m.group(0), n * BYTES[m.group(1)]))
        if op == "all-to-all":
            parts = [(" + ".join(p for p, _ in parts), sum(b for _, b in parts))]
        out += [(op, p, b) for p, b in parts]
    return out


def _dims(shape):
    return [int(d) for d in re.findall(r"\[([\d,]*)\]", shape)[0].split(",") if d]


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

    for kind in SHARED:
        shared_table_rows(kind, T)


# ---- UltraMemV2 and Memory+: one shared table, extra per-token inputs (pre_x, gate) cut by columns --------------

SHARED = {  # the 227M presets' memory shapes (configs/models/ultramemv2-227m.yml, memplus-227m.yml)
    "v2": dict(title="UltraMemV2-227M memory layer (P and V shared, split alike)", D=768, DV=192, DP=192, K=32, C=2,
               memory=lambda: MemoryConfig.ultramemv2(num_keys=64, key_dim=192, value_dim=192, pre_value_dim=192,
                                                      topk=32, cores=2)),
    "memplus": dict(title="Memory+-227M memory layer (one pool, gated bag)", D=768, DV=768, DP=None, K=160, C=1,
                    memory=lambda: MemoryConfig.memplus(num_keys=128, key_dim=192, value_dim=768, heads=2,
                                                        topk=80)),
}
SHARED_CASES = [("replicated", {"data": 2, "fsdp": 1, "tensor": 4}, {}),
                ("number_wise (rows/tensor)", {"data": 2, "fsdp": 1, "tensor": 4}, {"rows": ["tensor"]}),
                ("dimension_wise (cols/tensor)", {"data": 2, "fsdp": 1, "tensor": 4}, {"cols": ["tensor"]}),
                ("hybrid (rows/fsdp, cols/tensor)", {"data": 1, "fsdp": 2, "tensor": 4},
                 {"rows": ["fsdp"], "cols": ["tensor"]}),
                ("number_wise over token axes (rows/data+fsdp)", {"data": 2, "fsdp": 4, "tensor": 1},
                 {"rows": ["data", "fsdp"]}),
                ("cols over token axes (cols/fsdp+tensor)", {"data": 1, "fsdp": 2, "tensor": 4},
                 {"cols": ["fsdp", "tensor"]})]


def shared_table_rows(kind: str, T: int):
    """Prints the layouts' table for V2 or Memory+: each collective, its bytes per local token, and the formula
    from the layout (what the collective should carry), so a mismatch shows."""
    k = SHARED[kind]
    D, DV, DP, K, C = k["D"], k["DV"], k["DP"], k["K"], k["C"]
    extra, width, wname = ("pre_x", DP, "D_p") if kind == "v2" else ("gate", DV, "D_v")
    dims = f"D={D}, D_v={DV}" + (f", D_p={DP}" if DP else "") + f", K={K}, cores={C}"
    print(f"\n{k['title']}: {dims}, {T} tokens, 8 devices, f32\n")
    print("| layout | mesh | collective (forward) | per device | bytes / local token | formula |")
    print("|---|---|---|---|---|---|")
    for name, mesh_cfg, lay in SHARED_CASES:
        mesh = make_mesh(mesh_cfg)
        cfg = ModelConfig(vocab_size=16, d_model=D, num_layers=2, num_heads=12, memory=k["memory"](),
                          memory_placement="0:0")
        layout, rules = memory_layout(lay, mesh, logical_rules([], mesh), cfg, T)
        r = dict(rules)
        tok = batch_sharding(mesh, rules).spec[0]
        N = cfg.memory.table_rows
        table = NamedSharding(mesh, P(r["value_rows"], r["value_dim"]))
        spec = lambda *axes: NamedSharding(mesh, P(*axes))  # noqa: E731
        args_ = [jax.ShapeDtypeStruct((N, DV), jnp.float32, sharding=table),
                 jax.ShapeDtypeStruct((1, DV, D), jnp.float32, sharding=spec(None, r["value_dim"], None)),
                 jax.ShapeDtypeStruct((T, K), jnp.int32, sharding=spec(tok, None)),
                 jax.ShapeDtypeStruct((T, K, C), jnp.float32, sharding=spec(tok, None, None)),
                 jax.ShapeDtypeStruct((T, width), jnp.float32, sharding=spec(tok, None))]
        if kind == "v2":
            args_.append(jax.ShapeDtypeStruct((N, DP), jnp.float32, sharding=table))

            def fwd(v, w, i, s, x, pv):
                return lookup.memory_lookup(layout, v, w, i, s, N, 1, pre_values_NxP=pv, pre_x_TxP=x)
        else:
            def fwd(v, w, i, s, g):
                return lookup.memory_lookup(layout, v, w, i, s, N, 1, gate_TxD=g)
        with jax.set_mesh(mesh):
            hlo = jax.jit(fwd).lower(*args_).compile().as_text()
        t_local = T // (int(np.prod([mesh.shape[a] for a in layout.token_axes])) if layout else 1)
        R, Cols, B = (layout.row_axes, layout.col_axes, layout.token_axes) if layout else ((), (), ())
        group = [a for a in B if a in R + Cols]
        p_grp = int(np.prod([mesh.shape[a] for a in group])) if group else 1
        n_cols = int(np.prod([mesh.shape[a] for a in Cols])) if Cols else 1
        cols_split_tokens = bool(set(Cols) & set(B))
        c_loc = C if cols_split_tokens else max(1, C // n_cols)
        w_loc = width if (cols_split_tokens and set(R) & set(B)) else width // n_cols  # the per-token slice
        found = collectives(hlo)
        if not found:
            print(f"| {name} | {mesh_cfg} | none | 0 | 0 | 0 |")
        for op, shape, nbytes in sorted(found):
            d = _dims(shape)
            if op == "all-gather":  # each device contributes 1/p_grp of the result
                per_tok = nbytes / p_grp / t_local
                formula = (f"K·4 = {K * 4}" if shape.startswith("s32") else
                           f"K·C_loc·4 = {K * c_loc * 4}" if len(d) == 3 else
                           (f"{extra} {wname}·4 = {width * 4}" if w_loc == width else
                            f"{extra} slice {wname}/{width // w_loc}·4 = {w_loc * 4}"))
            elif op == "all-to-all":  # a device's operand: its tokens' slices for every member of the group
                per_tok = nbytes / t_local
                formula = f"{extra} slices p·{wname}/{n_cols}·4 = {p_grp * width // n_cols * 4}"
            else:  # all-reduce, or reduce-scatter's (scattered) result
                per_tok = nbytes / t_local
                if d[-1] == K:  # V2's partial pre-value dots, for every token the shard serves
                    formula = f"dots {'p·' if p_grp > 1 else ''}K·4 = {p_grp * K * 4}"
                else:
                    formula = f"D·4 = {D * 4}"
            print(f"| {name} | {mesh_cfg} | {op} {shape} | {nbytes:,} B | {per_tok:,.0f} | {formula} |")


if __name__ == "__main__":
    main()
