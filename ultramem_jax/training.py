"""The machinery behind train.py: jitted steps over split NNX state, evaluation, throughput and MFU."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultramem_jax import data, lookup, row_adam, value_rows
from ultramem_jax.memory import TapSource, ValueTap
from ultramem_jax.optim import clip_factor, make_optimizer, param_labels, value_row_hyper
from ultramem_jax.params import param_counts
from ultramem_jax.stats import mean_core_singular_values, memory_health, row_counts, usage_stats
from ultramem_jax.transformer import create_model, lm_loss


TAPS = {"values": "value_tap", "pre_values": "pre_value_tap"}  # a table → the layers' tap on its gathered rows


def optax_params(optim_cfg):
    """The parameters optax updates: all of them, or all but the value tables (sparse value updates)."""
    if not optim_cfg.sparse_values:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(name) for name in TAPS))))


def value_tables(model):
    """[(table, [(layer index, tap name), …])]: every value table the sparse update owns, with the layers that read
    it.  V1 / PKM: each layer's own table; UltraMemV2: the shared values and pre-values, Memory+: the shared pool,
    each read by every memory layer (their reads are summed into one row update per table and step)."""
    if model.memory_table is None:
        return [(mem.values, [(i, TAPS["values"])]) for i, mem in enumerate(model.memories)]
    readers = range(len(model.memories))
    return [(getattr(model.memory_table, name), [(i, tap) for i in readers])
            for name, tap in TAPS.items() if hasattr(model.memory_table, name)]


def build(cfg, mesh, rules, layout=None):
    """Model and optimizer, created sharded under the mesh; returns graphdefs and states.  With sparse value
    updates the optimizer also holds each table's row state (``value_rows``, ordered as ``value_tables``) and its
    constants (static)."""
    model = create_model(cfg.model, seed=cfg.seed, mesh=mesh, rules=rules, layout=layout)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        opt = nnx.Optimizer(model, make_optimizer(cfg.optim, cfg.steps), wrt=optax_params(cfg.optim))
        if cfg.optim.sparse_values:
            opt.value_rows = nnx.List([row_adam.RowAdamState(t[...]) for t, _ in value_tables(model)])
            opt.value_hyper = value_row_hyper(cfg.optim, cfg.steps)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(opt)
    return model_def, model_state, opt_def, opt_state


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _under_mesh(fn, mesh):
    """Traces and runs ``fn`` with ``mesh`` as the ambient mesh (the memory lookup's shard_map uses it)."""
    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    def lower(*args):  # for inspecting the compiled step (tests, benchmarks)
        with jax.set_mesh(mesh):
            return fn.lower(*args)
    call.lower = lower
    return call


def _grad_norms(grads) -> dict:
    """Global gradient norm, and separately the value tables' and the rest's (memory health)."""
    labels = jax.tree.leaves(param_labels(grads))
    leaves = jax.tree.leaves(grads)
    sq = {name: sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g, lab in zip(leaves, labels) if lab == name),
                    jnp.zeros((), jnp.float32)) for name in ("values", "other")}
    out = {"grad_norm": jnp.sqrt(sq["values"] + sq["other"])}
    if any(lab == "values" for lab in labels):
        out.update(grad_norm_values=jnp.sqrt(sq["values"]), grad_norm_other=jnp.sqrt(sq["other"]))
    return out


def _sparse_value_step(model, opt, tokens):
    """Forward, backward and update with row-sparse value tables (row_adam.py): the gradient is taken with
    respect to zero taps on the gathered rows, never the tables; duplicate rows are summed, clipping sees the
    exact value-table norm, and only the touched rows of the tables and moments are written (under a sharded
    layout, by the shard that owns them: value_rows.py).  With ``sparse`` the lookups read the gathered rows
    caught up to this step from the row state (memory.TapSource), so the forward pass and its gradients are
    dense AdamW's; ``lazy`` reads them as stored.  A table several layers read (UltraMemV2's, Memory+'s) takes
    their reads together: one row gradient per touched row, one update.  Returns (loss, (ce, aux)), gradient
    norms."""
    hyper = opt.value_hyper
    T = tokens.shape[0] * (tokens.shape[1] - 1)
    tables, layers = value_tables(model), model.memories
    step = opt.step[...].astype(jnp.int32)
    for (table, readers), state in zip(tables, opt.value_rows):
        source = (lookup.RowSource(state.m[...], state.v[...], state.last[...], step, hyper.read)
                  if hyper.mode == "sparse" else None)
        for i, tap in readers:
            c = layers[i].cfg
            setattr(layers[i], tap, ValueTap(lookup.new_tap(layers[i].layout, T, c.heads * c.topk, table.shape[1],
                                                            table.dtype)))
            if source is not None:
                setattr(layers[i], tap + "_source", TapSource(source))
    wrt = opt.wrt
    (loss, (ce, aux)), grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.Any(wrt, ValueTap)),
                                                  has_aux=True)(model, tokens)
    rows = []
    for table, readers in tables:  # the readers' taps side by side: T×(L·K) ids, their row cotangents
        ids = [layers[i].table_rows(aux["memory"][i]["rows"]) for i, _ in readers]
        taps = [grads["memories"][i][tap][...] for i, tap in readers]
        ids, taps = (ids[0], taps[0]) if len(readers) == 1 else (jnp.concatenate(ids, -1), jnp.concatenate(taps, -2))
        rows.append(value_rows.row_grads(layers[readers[0][0]].layout, ids, taps, table.shape[0]))
    for table, readers in tables:
        for i, tap in readers:
            delattr(layers[i], tap)
            if hasattr(layers[i], tap + "_source"):
                delattr(layers[i], tap + "_source")
    other = nnx.state(grads, wrt)
    sq = {"values": sum((r[2] for r in rows), jnp.zeros((), jnp.float32)),
          "other": sum((jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(other)),
                       jnp.zeros((), jnp.float32))}
    norms = {"grad_norm": jnp.sqrt(sq["values"] + sq["other"])}
    if rows:
        norms.update(grad_norm_values=jnp.sqrt(sq["values"]), grad_norm_other=jnp.sqrt(sq["other"]))
    if hyper.value_grad_clip > 0:  # values by their own norm; the rest by optax's clip in make_optimizer
        value_scale = clip_factor(jnp.sqrt(sq["values"]), hyper.value_grad_clip)
    else:  # one clip over every gradient
        value_scale = clip_factor(norms["grad_norm"], hyper.grad_clip)
        other = jax.tree.map(lambda g: (g * value_scale).astype(g.dtype), other)
    opt.update(model, other)
    for (table, readers), state, (ids, g, _) in zip(tables, opt.value_rows, rows):
        layout = layers[readers[0][0]].layout
        table[...] = value_rows.update(layout, hyper, table[...], state, ids, g * value_scale, step)
    return (loss, (ce, aux)), norms


def make_train_step(model_def, opt_def, model_state, opt_state, usage, batch_sharding):
    """(model_state, opt_state, usage, tokens) → same, plus metrics.  Runs the once-per-step TDQKR refresh
    before the forward pass; ``usage`` counts how often each value row was read since the last log."""

    def step(model_state, opt_state, usage, tokens):
        model, opt = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
        model.refresh_tucker()
        if hasattr(opt, "value_rows"):
            (loss, (ce, aux)), norms = _sparse_value_step(model, opt, tokens)
        else:
            (loss, (ce, aux)), grads = nnx.value_and_grad(lm_loss, has_aux=True)(model, tokens)
            opt.update(model, grads)
            norms = _grad_norms(grads)
        usage = [u + row_counts(info["rows"], u.shape[0]) for u, info in zip(usage, aux["memory"])]
        metrics = {"loss": loss, "ce": ce, "aux_loss": aux["aux_loss"], **norms,
                   **memory_health(aux["memory"])}
        spectra = mean_core_singular_values(model.memories)
        if spectra is not None:
            metrics["core_sv"] = spectra
        return nnx.state(model), nnx.state(opt), usage, metrics

    shard = (_shardings(model_state), _shardings(opt_state), _shardings(usage))
    return _under_mesh(jax.jit(step, in_shardings=(*shard, batch_sharding), out_shardings=(*shard, None),
                               donate_argnums=(0, 1, 2)), batch_sharding.mesh)


def make_flush(model_def, opt_def, model_state, opt_state):
    """(model_state, opt_state) → same with every value table caught up to the current step (row_adam.flush),
    so what is saved or evaluated is the dense optimizer's table (``sparse``; ``lazy``'s stays as it is).  The
    identity without sparse value updates."""
    opt = nnx.merge(opt_def, opt_state)
    if not hasattr(opt, "value_rows"):
        return lambda model_state, opt_state: (model_state, opt_state)

    def flush(model_state, opt_state):
        model, opt = nnx.merge(model_def, model_state), nnx.merge(opt_def, opt_state)
        step = opt.step[...].astype(jnp.int32)
        for (table, _), state in zip(value_tables(model), opt.value_rows):
            table[...] = row_adam.flush(opt.value_hyper, table[...], state, step)
        return nnx.state(model), nnx.state(opt)

    shard = (_shardings(model_state), _shardings(opt_state))
    return jax.jit(flush, in_shardings=shard, out_shardings=shard, donate_argnums=(0, 1))


@jax.jit
def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_eval_step(model_def, mesh):
    def step(model_state, tokens, mask):
        model = nnx.merge(model_def, model_state)
        _, (ce, _) = lm_loss(model, tokens, mask)
        n = mask[:, 1:].sum()
        return ce * n, n

    return _under_mesh(jax.jit(step), mesh)


def validation_loss(eval_step, model_state, val_stream, cfg, sharding) -> tuple[float, int]:
    """Mean next-token loss over every validation token of ``cfg``'s batches (padding masked out).

    train.py's periodic eval and ``python -m ultramem_jax.eval`` both call this, so they agree exactly.
    """
    to_global = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])  # noqa: E731
    total, count = 0.0, 0
    for tokens, mask in data.val_batches(val_stream, cfg.seq_len, cfg.batch_size, cfg.eval_batches):
        s, n = eval_step(model_state, to_global(tokens), to_global(mask))
        total, count = total + float(s), count + int(n)
    return total / max(count, 1), count


def memory_health_report(model_def, model_state, val_stream, cfg, sharding, batches: int = 8) -> dict:
    """Memory health of a model over ``batches`` validation batches (eval's report for a checkpoint): the
    per-layer mean of each statistic, and usage over all of them, named as in metrics.jsonl."""
    num_layers = cfg.model.num_memory_layers
    if not num_layers:
        return {}
    num_values = cfg.model.resolved_memory.num_values

    def health(model_state, tokens):
        _, aux = nnx.merge(model_def, model_state)(tokens[:, :-1])
        return memory_health(aux["memory"]), [row_counts(i["rows"], num_values) for i in aux["memory"]]

    health = _under_mesh(jax.jit(health), sharding.mesh)

    to_global = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])  # noqa: E731
    sums, counts, n = {}, [np.zeros(num_values, np.int64) for _ in range(num_layers)], 0
    for tokens, _ in data.val_batches(val_stream, cfg.seq_len, cfg.batch_size, batches):
        stats, rows = jax.device_get(health(model_state, to_global(tokens)))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + np.asarray(v, np.float64)
        for acc, c in zip(counts, rows):
            acc += c
        n += 1
    report = to_float_dict({k: v / max(n, 1) for k, v in sums.items()})
    for k, c in enumerate(counts):
        report[f"mem{k}/usage"], report[f"mem{k}/usage_entropy"] = usage_stats(c)
    return report


def new_usage(cfg, mesh):
    n = cfg.model.resolved_memory.num_values if cfg.model.memory else 0
    with jax.set_mesh(mesh):
        return [jnp.zeros((n,), jnp.int32) for _ in range(cfg.model.num_memory_layers)]


# ---- throughput --------------------------------------------------------------------------------------------

KNOWN_PEAK_TFLOPS = {  # dense bf16 per chip
    "tpu v4": 275, "tpu v5 lite": 197, "tpu v5e": 197, "tpu v5p": 459, "tpu v5": 459, "tpu v6 lite": 918,
    "tpu v6e": 918, "tpu7x": 2307, "h100": 989, "h200": 989, "a100": 312, "b200": 2250, "l4": 121,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> tuple[float, str]:
    """(FLOP/s, how it was obtained). CPUs have no spec sheet here: a timed f32 matmul stands in."""
    if override_tflops > 0:
        return override_tflops * 1e12, "config"
    kind = jax.devices()[0].device_kind.lower()
    for name, tflops in KNOWN_PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12, kind
    x = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        y = f(x)
    y.block_until_ready()
    n_dev = max(1, len(jax.devices()))
    return 2 * 1024 ** 3 * reps / (time.perf_counter() - t) / n_dev, "measured matmul"


def train_flops_per_token(model_cfg, seq_len: int) -> float:
    """6·(activated non-embedding params) + attention scores (12·L·S·D): the usual MFU convention."""
    counts = param_counts(model_cfg)
    return 6 * (counts["activated_per_token"] - model_cfg.d_model) + \
        12 * model_cfg.num_layers * seq_len * model_cfg.d_model


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def to_float_dict(metrics) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = float(v)
        elif v.ndim == 1:
            out.update({f"mem{i}/{k}": float(x) for i, x in enumerate(v)})
        else:  # (layers, r): one series per singular value
            out.update({f"mem{i}/{k}{j + 1}": float(x) for i, row in enumerate(v) for j, x in enumerate(row)})
    return out
