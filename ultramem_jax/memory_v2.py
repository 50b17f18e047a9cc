"""The UltraMemV2 memory layer (arXiv 2508.18756; anchors-2026.md §1), as Flax NNX modules.

Per token (x: the normalised input of the FFN of the block the layer sits in; its output joins the residual
stream after that block, in parallel with the FFN):

    q[s, a] = RMSNorm(W_q x)[s, a]                      one query per side s and Tucker rank a (paper Eq. 10–11)
    S_s[a, i] = <q[s, a], K_s[i, :, a]>                  rank-r key scores over n' = √E·n keys per side
    winners (slot, s_k⁽ᶜ⁾) = TDQKR + MCS top-m          the V1 search (tdqkr.py, key_search.py), unchanged
    local_k = π(slot_k) mod N                            the E key-expansion groups fold onto one window row:
                                                         their contributions are summed before the projector
    row_k = (local_k + offset_ℓ) mod table_rows          the layer's window of the shared table (table_share.py)
    g_k = <P[row_k], W_pre x>                            PEER-style pre-value dot, no activation
    y = W_o concat_c Σ_k g_k · s_k⁽ᶜ⁾ · V[row_k, c-th slice]   one projection D_v → D (MCS slices as in V1)

P (rows × D_p) and V (rows × D_v) live in ``SharedValueTable``, one module for the whole model, passed to every
layer's call.  The weighted gather is V1's (``lookup.memory_lookup`` with one block, which also takes the pre-value
dot), so its table layouts apply; where a shard holds whole P rows it runs the fused pre-value gather
(``kernels.pre_value_gather``, pallas_kernels/pre_value_gather.py).

Where the released code differs (anchors-2026.md §1.3): its "query per Tucker rank" indexes the query so that
both sides' rank-a scores use row-side queries and the column-side half of W_q never gets a gradient; here
every (side, rank) pair has its own query, as the paper writes it (``query_per_rank: false`` gives V1's one
query per side instead).  Its tables start at N(0, 0.02²) and its projections at 1/√fan-in (``value_init:
code``); the paper's init (``paper``, init.py) is the default.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ultramem_jax import ive, kernels, lookup, table_share
from ultramem_jax import sharding as sh
from ultramem_jax.config import MemoryConfig
from ultramem_jax.gather import take_rows
from ultramem_jax.init import v2_linear_stds, v2_table_std, value_std
from ultramem_jax.memory import MemoryBuffer, UltraMemLayer, _param


class SharedValueTable(nnx.Module):
    """The pre-value table P (rows × D_p) and value table V (rows × D_v) that every V2 layer reads a window of;
    for Memory+ (memory_plus.py) the value pool V alone, read whole by every layer.

    ``cfg`` must be resolved by the model (``ModelConfig.resolved_memory``: ``table_layers`` filled in).
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, mlp_dim: int, num_layers: int, *, rngs: nnx.Rngs):
        cfg = cfg.resolved(d_model)
        names = (sh.VALUE_ROWS, sh.VALUE_DIM)
        if not cfg.is_v2:
            self.values = _param(None, rngs, (cfg.table_rows, cfg.value_dim), names, std=value_std(cfg, num_layers))
            return
        std = v2_table_std(cfg, d_model, mlp_dim, num_layers)
        self.pre_values = _param(None, rngs, (cfg.table_rows, cfg.pre_value_dim), names, std=std)
        self.values = _param(None, rngs, (cfg.table_rows, cfg.value_dim), names, std=std)


class UltraMemV2Layer(UltraMemLayer):
    """UltraMemV2: V1's retrieval (per-rank queries), PEER-style pre-values, a shared ring-windowed table.

    ``layer_index`` is the layer's place among the model's memory layers (its window offset and permutation
    seed); ``mlp_dim`` is the FFN's inner width (V2's init matches the memory's output variance to the FFN's).
    Refresh, Tucker penalty and balance loss come from ``UltraMemLayer``.
    """

    def __init__(self, cfg: MemoryConfig, d_model: int, num_layers: int, *, layer_index: int = 0,
                 mlp_dim: int | None = None, rngs: nnx.Rngs):
        if not cfg.is_v2:
            raise ValueError("memory.kind: UltraMemV2Layer needs kind ultramemv2 (MemoryConfig.ultramemv2(...))")
        cfg.validate(d_model)
        cfg = cfg.resolved(d_model)
        self.cfg, self.d_model = cfg, d_model
        stds = v2_linear_stds(cfg, d_model)
        ranks = cfg.rank if cfg.query_per_rank else 1
        self._init_retrieval(cfg, d_model, query_ranks=ranks, query_std=stds["query"], rngs=rngs)
        # columns split like P's (value_dim): a column shard's slice of W_pre x meets its slice of P
        self.pre_proj = _param(None, rngs, (d_model, cfg.pre_value_dim), (sh.EMBED, sh.VALUE_DIM),
                               std=stds["pre_proj"])
        out_std = stds["out_proj"] if cfg.out_proj_std is None else cfg.out_proj_std
        # one projector, kept E×D_v×D-shaped (E = 1) so V1's lookup and kernels take it as they are
        self.out_proj = _param(None, rngs, (1, cfg.value_dim, d_model), (sh.IVE_BLOCKS, sh.VALUE_DIM, sh.EMBED),
                               std=out_std)
        E, N = cfg.expansion, cfg.num_values
        # a permutation per layer (V1 draws one seed for all): different layers fold their groups differently
        self.permutation = (MemoryBuffer(jnp.asarray(ive.make_permutation(cfg.seed + layer_index, E * N)))
                            if cfg.shuffle and E > 1 else None)
        self.offset = table_share.window_offset(cfg, layer_index)
        self.layout: lookup.MemoryLayout | None = None  # how the shared table is split (set by create_model)
        self.impl = kernels.resolve(cfg.kernels)

    def __call__(self, x_BxSxD: jax.Array, table: SharedValueTable):
        """Returns (output B×S×D, info); ``info['rows']`` are window-relative rows (usage statistics)."""
        cfg = self.cfg
        x_TxD = x_BxSxD.reshape(-1, x_BxSxD.shape[-1])
        raw_TxHxMxC, slots_TxHxM, balance = self._select(x_TxD)
        scores_TxHxMxC = self._activate(raw_TxHxMxC)
        ids_TxHxM = slots_TxHxM if self.permutation is None else take_rows(self.permutation[...], slots_TxHxM)
        K = cfg.heads * cfg.topk
        local_TxK = (ids_TxHxM % cfg.num_values).reshape(-1, K)
        rows_TxK = table_share.physical_rows(local_TxK, self.offset, cfg.table_rows)
        pre_TxP = x_TxD @ self.pre_proj[...].astype(x_TxD.dtype)
        # the lookup scales each score by the pre-value dot <P[row_k], pre>, on whichever shard holds P[row_k]
        out_TxD = lookup.memory_lookup(self.layout, table.values[...], self.out_proj[...], rows_TxK,
                                       scores_TxHxMxC.reshape(-1, K, cfg.cores), cfg.table_rows, 1, impl=self.impl,
                                       pre_values_NxP=table.pre_values[...], pre_x_TxP=pre_TxP,
                                       tap_TxKxD=self._value_tap(), pre_tap_TxKxP=self._value_tap("pre_value_tap"),
                                       source=self._tap_source(), pre_source=self._tap_source("pre_value_tap"))
        return self._finish(out_TxD, x_BxSxD.shape, raw_TxHxMxC, local_TxK, balance)

    def table_rows(self, rows_TxK):
        """Window-relative rows (``info['rows']``) → rows of the shared table."""
        return table_share.physical_rows(rows_TxK, self.offset, self.cfg.table_rows)
