"""The UltraMem memory layer (V1, method notes A.6) and the PKM baseline, as Flax NNX modules.

Per token (x: the pre-FFN normalised hidden of the block the layer reads):

    q = W_q x → (q_row, q_col), RMS-normalised              shared by all H heads (or one per head, PKM)
    S_row = K_row q_row, S_col = K_col q_col                  rank-r key scores, keys RMS-normalised too
    winners, per-core scores = TDQKR + MCS  (or additive product keys)
    (block, row) = divmod(π[slot], N)                         IVE shuffle
    pooled[p] = Σ_{k: block_k = p} s_k ⊙ V[row_k]             weighted gather, per-core value slices
    out = Σ_p W_pᵀ pooled[p]                                  the E projectors, one (E, D_v, D) tensor
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax import ive, kernels, lookup, tdqkr
from ultramem_jax import sharding as sh
from ultramem_jax.config import MemoryConfig
from ultramem_jax.gather import take_rows
from ultramem_jax.init import norm_weights, value_std


class MemoryBuffer(nnx.Variable):
    """A fixed, non-trainable array of the layer (the IVE permutation)."""


class ValueTap(nnx.Variable):
    """Zeros added to the gathered value (or V2's pre-value) rows, T×K×D, by the sparse-update train step: their
    gradient is the rows' gradient, so the table itself stays outside autodiff (row_adam.py).  Absent outside that
    step."""


class TapSource(nnx.Variable):
    """Next to a ``ValueTap`` (``<tap>_source``; ``optim.value_update: sparse``): the tapped table's row state, a
    ``lookup.RowSource``, so the lookup reads the rows as dense AdamW holds them, their skipped steps caught up.
    Not differentiated; absent outside that step and with ``lazy`` (rows read as stored)."""


class TuckerVectors(nnx.Variable):
    """The detached leading singular vectors (u, t) used for the pre-selection; refreshed once per step.

    They are state, not parameters: stored in checkpoints so evaluation reproduces training exactly.
    """


def _param(init, rngs, shape, names, std=None):
    key = rngs.params()
    value = init(key, shape) if std is None else std * jax.random.normal(key, shape, jnp.float32)
    return nnx.Param(value, out_sharding=names)


def _rms_normalize(x, eps):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class UltraMemLayer(nnx.Module):
    """UltraMem V1: TDQKR retrieval, Multi-Core Scoring and Implicit Value Expansion.

    Also covers the ablation path from PKM (``retrieval='product_key'``, ``expansion=1``, ``cores=1``,
    softmax scores, ...), since every step of the paper's Table 2 is a knob of ``MemoryConfig``.
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, num_layers: int, *, rngs: nnx.Rngs):
        cfg.validate(d_model)
        cfg = cfg.resolved(d_model)
        self.cfg, self.d_model = cfg, d_model
        Dk, Dv, E, N = cfg.key_dim, cfg.value_dim, cfg.expansion, cfg.num_values
        self._init_retrieval(cfg, d_model, query_ranks=1, query_std=Dk ** -0.5, rngs=rngs)
        self.values = _param(None, rngs, (N, Dv), (sh.VALUE_ROWS, sh.VALUE_DIM), std=value_std(cfg, num_layers))
        if cfg.output_proj:
            std = (E * Dv) ** -0.5 if cfg.out_proj_std is None else cfg.out_proj_std
            self.out_proj = _param(None, rngs, (E, Dv, d_model), (sh.IVE_BLOCKS, sh.VALUE_DIM, sh.EMBED), std=std)
        self.permutation = (MemoryBuffer(jnp.asarray(ive.make_permutation(cfg.seed, E * N)))
                            if cfg.shuffle and E > 1 else None)
        self.layout: lookup.MemoryLayout | None = None  # how the value table is split (set by create_model)
        self.impl = kernels.resolve(cfg.kernels)  # XLA ops or Pallas kernels, for this platform

    def _init_retrieval(self, cfg: MemoryConfig, d_model: int, query_ranks: int, query_std: float,
                        rngs: nnx.Rngs):
        """Query projection, keys, q/k norms, Tucker cores: the retrieval half, shared with UltraMemV2.

        ``query_ranks`` > 1 gives every side one query per Tucker rank (UltraMemV2's paper semantics).
        """
        H, Dk, r, C = cfg.heads, cfg.key_dim, cfg.rank, cfg.cores
        n_side = cfg.keys_per_side
        self.query_heads = 1 if cfg.share_query else H
        self.query_ranks = query_ranks
        q_feat = self.query_heads * 2 * query_ranks * Dk
        self.query = _param(None, rngs, (d_model, q_feat), (sh.EMBED, sh.MEM_QUERY), std=query_std)
        past = cfg.query_batchnorm == "past"  # its statistics follow the last ~10 steps, not ~100
        self.query_bn = (nnx.BatchNorm(q_feat, use_running_average=past, momentum=0.9 if past else 0.99, rngs=rngs)
                         if cfg.query_batchnorm != "none" else None)
        # keys[h, side, i, :, a]: the a-th rank vector of key i on side (0 = row, 1 = column) of head h
        self.keys = _param(None, rngs, (H, 2, n_side, Dk, r), (sh.MEM_HEADS, None, sh.MEM_KEYS, None, None),
                           std=Dk ** -0.5)
        if cfg.qk_norm:
            q_w, k_w = norm_weights(cfg)
            self.query_norm = nnx.Param(jnp.full((Dk,), q_w, jnp.float32), out_sharding=(sh.NORM,))
            self.key_norm = nnx.Param(jnp.full((Dk,), k_w, jnp.float32), out_sharding=(sh.NORM,))
        if cfg.retrieval == "tdqkr":
            self.cores = nnx.Param(jax.random.uniform(rngs.params(), (C, H, r, r), jnp.float32),
                                   out_sharding=(None, sh.MEM_HEADS, None, None))
            u, t = tdqkr.initial_tucker_vectors(H, r)
            self.tucker_u, self.tucker_t = TuckerVectors(u), TuckerVectors(t)
            self.refresh_tucker()  # before any forward: never pre-select with stale or zero vectors

    # ---- TDQKR state -------------------------------------------------------------------------------
    def refresh_tucker(self):
        """Once per optimizer step (and at init / after a restore): u, t ← leading SVD pair of Σ_c C⁽ᶜ⁾."""
        if self.cfg.retrieval != "tdqkr":
            return
        u, t = tdqkr.refresh_tucker_vectors(self.cores[...], self.tucker_u[...], self.tucker_t[...])
        self.tucker_u[...], self.tucker_t[...] = u, t

    def aux_loss(self) -> jax.Array:
        cfg = self.cfg
        if cfg.retrieval != "tdqkr" or not cfg.aux_loss:
            return jnp.zeros((), jnp.float32)
        return tdqkr.tucker_aux_loss(self.cores[...], cfg.aux_alpha, cfg.aux_tau, cfg.aux_reduction)

    # ---- forward -----------------------------------------------------------------------------------
    def retrieve(self, x_TxD: jax.Array, with_balance: bool = False):
        """Selects H·m virtual slots per token. Returns (scores T×H×M×C before activation, slots T×H×M), and
        with ``with_balance`` the pre-selection balance loss third."""
        cfg = self.cfg
        T = x_TxD.shape[0]
        q = x_TxD @ self.query[...].astype(x_TxD.dtype)
        if self.query_bn is not None:
            q = self._query_batchnorm(q)
        # T×Q×2×D, or T×Q×2×R×D with one query per Tucker rank (V2): the RMS norm acts on each D-vector
        rank_axis = (self.query_ranks,) if self.query_ranks > 1 else ()
        q_TxQx2xD = q.reshape(T, self.query_heads, 2, *rank_axis, cfg.key_dim)
        keys = self.keys[...].astype(x_TxD.dtype)
        if cfg.qk_norm:
            q_TxQx2xD = _rms_normalize(q_TxQx2xD, cfg.norm_eps) * self.query_norm[...].astype(q.dtype)
            keys = _rms_normalize(jnp.moveaxis(keys, 3, -1), cfg.norm_eps) * self.key_norm[...].astype(q.dtype)
            keys = jnp.moveaxis(keys, -1, 3)
        q_TxHx2xD = jnp.broadcast_to(q_TxQx2xD, (T, cfg.heads, *q_TxQx2xD.shape[2:]))
        if cfg.retrieval == "tdqkr":
            cores, u, t = self.cores[...].astype(q.dtype), self.tucker_u[...], self.tucker_t[...]
        else:
            cores = u = t = None
        scores, slots = kernels.search(q_TxHx2xD[:, :, 0], q_TxHx2xD[:, :, 1], keys[:, 0], keys[:, 1], cores, u, t,
                                       cfg.m_pre, cfg.topk, cfg.retrieval == "product_key", self.impl)
        if not with_balance:
            return scores, slots
        return scores, slots, self._balance_loss(q_TxHx2xD, keys, slots)

    def _query_batchnorm(self, q_TxF):
        """PKM's query BatchNorm. ``past``: normalised with the statistics of earlier steps (the BatchNorm runs on
        its running averages), then this batch's statistics are folded into them for the next step, outside the
        gradient. A train step keeps the update; evaluation and generation discard it."""
        bn = self.query_bn
        if self.cfg.query_batchnorm == "batch":
            return bn(q_TxF)
        out = bn(q_TxF)
        q32 = jax.lax.stop_gradient(q_TxF.astype(jnp.float32))
        mean = q32.mean(axis=0)
        var = jnp.mean(jnp.square(q32 - mean), axis=0)
        bn.mean[...] = bn.momentum * bn.mean[...] + (1 - bn.momentum) * mean
        bn.var[...] = bn.momentum * bn.var[...] + (1 - bn.momentum) * var
        return out

    def _balance_loss(self, q_TxHx2xD, keys_Hx2xNxDxR, slots_TxHxM):
        """UltraMemV2's balance loss on the row and column pre-selection (its Eq. 19), per side and head:

            N · Σ_n f_n · p̄_n,   p̄ = mean over tokens of softmax_n(uᵀ S[:, n]),   f_n = share of the winners in
            row (column) n

        It is 1 when the winners spread evenly over the keys and grows as they pile onto few; p̄ carries the
        gradient (to queries and keys), f is a count.  Returns β times its mean over sides and heads.
        """
        cfg = self.cfg
        n = cfg.keys_per_side
        T, H, M = slots_TxHxM.shape
        ids = {0: slots_TxHxM // n, 1: slots_TxHxM % n}
        total = jnp.zeros((), jnp.float32)
        for side in (0, 1):
            s_TxHxRxN = tdqkr.rank_key_scores(q_TxHx2xD[:, :, side], keys_Hx2xNxDxR[:, side]).astype(jnp.float32)
            if cfg.retrieval == "tdqkr":  # the pre-selection ranks keys by the rank-1 projection uᵀS (tᵀS)
                proj = (self.tucker_u if side == 0 else self.tucker_t)[...]
                logits_TxHxN = jnp.einsum("thrn,hr->thn", s_TxHxRxN, proj)
            else:
                logits_TxHxN = s_TxHxRxN[:, :, 0]
            p_HxN = jax.nn.softmax(logits_TxHxN, axis=-1).mean(0)
            f_HxN = jax.vmap(lambda i: jnp.zeros((n,), jnp.float32).at[i.reshape(-1)].add(1.0), in_axes=1)(
                jax.lax.stop_gradient(ids[side])) / (T * M)
            total += n * jnp.sum(f_HxN * p_HxN) / H
        return cfg.balance_loss * total / 2

    def _activate(self, scores_TxHxMxC):
        if self.cfg.score_activation == "softmax":  # PKM: normalise over each head's m winners
            return jax.nn.softmax(scores_TxHxMxC.astype(jnp.float32), axis=2).astype(scores_TxHxMxC.dtype)
        if self.cfg.score_activation == "relu":
            return jax.nn.relu(scores_TxHxMxC)
        return scores_TxHxMxC

    def __call__(self, x_BxSxD: jax.Array):
        """Returns (output B×S×D, info) where info holds what the memory statistics need."""
        cfg = self.cfg
        x_TxD = x_BxSxD.reshape(-1, x_BxSxD.shape[-1])
        raw_TxHxMxC, slots_TxHxM, balance = self._select(x_TxD)
        scores_TxHxMxC = self._activate(raw_TxHxMxC)
        # IVE shuffle: id = π(slot) = block·N + row, split again inside the lookup
        ids_TxHxM = slots_TxHxM if self.permutation is None else take_rows(self.permutation[...], slots_TxHxM)
        K = cfg.heads * cfg.topk  # all heads' winners pool into the same E blocks (official code)
        ids_TxK = ids_TxHxM.reshape(-1, K)
        out_proj = self.out_proj[...] if cfg.output_proj else None
        # the table goes in uncast: the lookup casts only the rows it reads to the scores' dtype
        out_TxD = lookup.memory_lookup(self.layout, self.values[...], out_proj, ids_TxK,
                                       scores_TxHxMxC.reshape(-1, K, cfg.cores), cfg.num_values, cfg.expansion,
                                       impl=self.impl, tap_TxKxD=self._value_tap(), source=self._tap_source())
        return self._finish(out_TxD, x_BxSxD.shape, raw_TxHxMxC, ids_TxK % cfg.num_values, balance)

    def _select(self, x_TxD):
        """(raw scores T×H×M×C, slots T×H×M, the balance loss or None): the retrieval every memory kind runs."""
        if self.cfg.balance_loss > 0:
            return self.retrieve(x_TxD, with_balance=True)
        return (*self.retrieve(x_TxD), None)

    def _value_tap(self, name: str = "value_tap"):
        """The zeros the sparse-update train step adds to the gathered value rows (``ValueTap``; V2's pre-value
        rows: ``pre_value_tap``), or None."""
        tap = getattr(self, name, None)
        return None if tap is None else tap[...]

    def _tap_source(self, name: str = "value_tap"):
        """The ``lookup.RowSource`` the train step put next to tap ``name`` (``TapSource``), or None."""
        source = getattr(self, name + "_source", None)
        return None if source is None else source.get_value()

    def table_rows(self, rows_TxK):
        """``info['rows']`` (what usage counts) as rows of the table this layer reads: the same rows here."""
        return rows_TxK

    def _finish(self, out_TxD, shape_BxSxD, raw_TxHxMxC, rows_TxK, balance):
        """The output scaled and reshaped, and the info the memory statistics need (``rows``: the table rows
        read, for usage)."""
        if self.cfg.output_scale != 1.0:
            out_TxD = out_TxD * self.cfg.output_scale
        selection = raw_TxHxMxC.sum(-1)  # the score each winner was selected by
        info = {"rows": rows_TxK, "top1": selection[:, :, 0].mean(), "topm": selection.mean()}
        if balance is not None:
            info["balance_loss"] = balance
        return out_TxD.reshape(shape_BxSxD), info


class PKMLayer(UltraMemLayer):
    """The original product-key memory (Lample et al. 2019), the baseline of the paper's ablation.

    Additive row + column scores, one query per head, softmax over the winners, optional query BatchNorm,
    values of width d_model read without projection.  Built from ``MemoryConfig.pkm(...)``.
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, num_layers: int, *, rngs: nnx.Rngs):
        if cfg.kind != "pkm":
            raise ValueError("memory.kind: PKMLayer needs a PKM config (MemoryConfig.pkm(...))")
        super().__init__(cfg, d_model, num_layers, rngs=rngs)


def memory_layer(cfg: MemoryConfig, d_model: int, num_layers: int, *, rngs: nnx.Rngs) -> UltraMemLayer:
    cls = PKMLayer if cfg.kind == "pkm" else UltraMemLayer
    return cls(cfg, d_model, num_layers, rngs=rngs)

