"""Sparse value updates under every memory layout (8 fake CPU devices): each shard's row gradients and row updates
against optax's AdamW on the dense table gradient of one device.  Sharded train steps against one device: the
end-to-end tests of test_sparse_update.py (V1 hybrid, UltraMemV2 dimension_wise), which reuse their one-device
runs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ultramem_jax import MemoryConfig, ModelConfig, lookup, row_adam, value_rows
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout
from ultramem_jax.optim import OptimConfig, value_lr_schedule, value_row_hyper

# (layout, mesh): rows over a tensor axis with data-parallel replicas; columns; rows over a token axis with columns
# and replicas; rows over every token axis with a 4-way axis the layout does not use
CASES = {
    "number_wise": ({"rows": ["tensor"]}, {"data": 2, "fsdp": 1, "tensor": 4}),
    "dimension_wise": ({"cols": ["tensor"]}, {"data": 1, "fsdp": 2, "tensor": 4}),
    "hybrid": ({"rows": ["fsdp"], "cols": ["tensor"]}, {"data": 2, "fsdp": 2, "tensor": 2}),
    "rows_over_token_axes": ({"rows": ["data", "fsdp"]}, {"data": 1, "fsdp": 2, "tensor": 4}),
}
T, K, N, D, E, C, O = 16, 6, 32, 8, 2, 2, 12


def test_sharded_rows_equal_dense_adamw_on_one_device(rng):
    """Four steps of lookup → tap gradient → row_grads → update under every layout (fresh ids with repeats, rows
    that sit out two steps and are read again, rows never read): each step's loss (the lookup reading the
    rows caught up, lookup.RowSource, sliced like the table) and value norm are the dense run's, and the flushed
    table and moments are optax AdamW's.  One dense run (one device, one compiled step) for all four layouts."""
    ocfg = OptimConfig(value_update="sparse", value_learning_rate=1e-2, weight_decay=0.1, warmup_frac=0.0)
    hyper = value_row_hyper(ocfg, 4)
    table0 = rng.standard_normal((N, D)).astype(np.float32)
    out_proj = jnp.asarray(rng.standard_normal((E, D, O)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((T, O)), jnp.float32)
    pools = [(0, 10), (10, 20), (20, N - 4), (0, N - 4)]  # rows 0 … 9 sit out steps 1 and 2; N-4 … N-1 never read
    batches = []
    for lo, hi in pools:
        ids = (rng.integers(0, E, (T, K)) * N + rng.integers(lo, hi, (T, K))).astype(np.int32)
        ids[:, 1] = ids[:, 0]  # repeats
        batches.append((ids, rng.standard_normal((T, K, C)).astype(np.float32)))

    def loss(values, tap, ids, scores, layout, source=None):
        """The loss, and the sum of its terms' magnitudes (the scale of its rounding: the terms cancel)."""
        out = lookup.memory_lookup(layout, values, out_proj, ids, scores, N, E, tap_TxKxD=tap, source=source)
        return jnp.sum(out * weights), jnp.sum(jnp.abs(out * weights))

    dense = optax.adamw(value_lr_schedule(ocfg, 4), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                        weight_decay=ocfg.weight_decay)

    @jax.jit
    def dense_step(p, s, ids, scores):
        (value, scale), g = jax.value_and_grad(loss, has_aux=True)(p, None, ids, scores, None)
        upd, s = dense.update(g, s, p)
        return optax.apply_updates(p, upd), s, (value, scale), jnp.sum(g ** 2)

    p_dense = jnp.asarray(table0)
    s_dense = dense.init(p_dense)
    want = []
    for ids, scores in batches:
        p_dense, s_dense, value, sq = dense_step(p_dense, s_dense, jnp.asarray(ids), jnp.asarray(scores))
        want.append((tuple(map(float, value)), float(sq)))
    assert np.abs(np.asarray(p_dense) - table0)[N - 4:].max() > 0  # never-read rows decayed: covered

    flush = jax.jit(lambda values, state, step: (row_adam.flush(hyper, values, state, step), state))
    for name, (layout_cfg, mesh_cfg) in CASES.items():
        mesh = make_mesh(mesh_cfg)
        model_cfg = ModelConfig(vocab_size=16, d_model=O, num_layers=2, num_heads=2, memory_placement="0:1",
                                memory=MemoryConfig(num_keys=8, value_dim=D, topk=2, cores=C))
        layout, rules = memory_layout(layout_cfg, mesh, logical_rules([], mesh), model_cfg, T)
        r = dict(rules)
        tok = batch_sharding(mesh, rules).spec[0]

        @jax.jit
        def sparse_step(values, state, ids, scores, step, layout=layout):
            tap = lookup.new_tap(layout, T, K, D, jnp.float32)
            source = lookup.RowSource(state.m[...], state.v[...], state.last[...], step, hyper.read)
            (value, _), g = jax.value_and_grad(loss, argnums=1, has_aux=True)(values, tap, ids, scores, layout, source)
            ids_U, grads, sq = value_rows.row_grads(layout, ids % N, g, N)
            return value_rows.update(layout, hyper, values, state, ids_U, grads, step), state, sq, value

        values = jax.device_put(table0, NamedSharding(mesh, P(r["value_rows"], r["value_dim"])))
        state = row_adam.RowAdamState(values)
        assert state.last[...].sharding.spec == P(r["value_rows"]), name
        for step, ((ids, scores), ((want_loss, scale), want_sq)) in enumerate(zip(batches, want)):
            with jax.set_mesh(mesh):
                values, state, sq, got = sparse_step(values, state,
                                                     jax.device_put(ids, NamedSharding(mesh, P(tok, None))),
                                                     jax.device_put(scores, NamedSharding(mesh, P(tok, None, None))),
                                                     jnp.int32(step))
            # atol at 1e-5 of the terms' magnitudes: the loss is a sum that cancels (seed 270979081: 3.107288
            # against 3.107331, 1.4e-5 relative, where the terms sum to ``scale`` in magnitude)
            np.testing.assert_allclose(float(got), want_loss, rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"{name}: loss at step {step}")
            np.testing.assert_allclose(float(sq), want_sq, rtol=1e-5, err_msg=name)
        values, state = flush(values, state, jnp.int32(len(pools)))
        assert values.sharding.is_equivalent_to(NamedSharding(mesh, P(r["value_rows"], r["value_dim"])), 2), name
        # rtol 2e-5: f32 sums in another order on the shards, seen at 1.4e-5 (hybrid)
        np.testing.assert_allclose(np.asarray(values), np.asarray(p_dense), rtol=2e-5, atol=1e-6, err_msg=name)
        # moments: atol at 1e-5 of the largest, for entries whose gradient cancels (f32 sums in another order on
        # the shards: m 3.6e-7 apart on an entry of -5.7e-3, v 3.4e-5 relative at seed 1608272326, dimension_wise)
        for got_mom, want_mom in ((state.m[...], s_dense[0].mu), (state.v[...], s_dense[0].nu)):
            np.testing.assert_allclose(np.asarray(got_mom), np.asarray(want_mom), rtol=1e-5,
                                       atol=1e-5 * float(np.abs(want_mom).max()), err_msg=name)
