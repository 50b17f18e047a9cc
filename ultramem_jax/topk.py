"""Exact top-k ids along the last axis, with ``lax.top_k``'s order, fast on CPU too.

XLA's CPU TopK runs a scalar partial sort per row (about 5 µs per row of 576 floats at k = 16), which made the
key search's three top-k's the largest part of the memory layer's forward pass on CPU. Here the rows become
lanes of vector ops instead: a bitonic network over the lanes, in chunks of lanes that stay in cache:

  1. groups of s neighbouring scores keep only their maximum; the top-k scores lie in the k best groups
     (each group ranked ahead of a top-k score's group holds a distinct score ahead of it, and fewer than k
     scores are ahead of it), so a network over the N/s group maxima picks k groups, and a second network
     over those k·s candidates picks the winners (s ≈ √(N/k) balances the two);
  2. each network sorts blocks of K = k rounded up to a power of two, then merges blocks pairwise, keeping
     the better K of each pair, until one block is left.

Order: scores compare as ``lax.top_k`` compares them (their float bits as sortable int32: -NaN < -inf < …
< -0 < +0 < … < inf < NaN), ties to the lower id, so the ids equal ``lax.top_k``'s exactly. On other
platforms ``lax.top_k`` itself runs (``lax.platform_dependent``), and on CPU too for calls too small to repay the
network's compile (``NETWORK_MIN_SCORES``).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ultramem_jax.gather import take_along

LANES = 128  # rows per chunk: a chunk's scores and ids (n·128·8 bytes) stay in the L2 cache
_MIN = jnp.iinfo(jnp.int32).min
# the network from this many scores per call: at 1024 x 64 (k 16) it ran in 0.5 ms against lax.top_k's 2.7, at
# 256 x 64 (k 8) 0.08 against 0.26 ms, after a 1.5-1.9 s compile against 0.02 s (CPU, benchmarks/topk_compile.py)
NETWORK_MIN_SCORES = 1 << 16


def top_k_ids(scores_BxN: jax.Array, k: int) -> jax.Array:
    """Ids (int32) of the k best scores along the last axis, best first, exactly as ``lax.top_k(x, k)[1]``.
    Small problems (rows · N < NETWORK_MIN_SCORES) take ``lax.top_k`` everywhere: the network's compile (1.5–2 s
    at that size) would cost more than its run-time gain (~0.2 ms a call) saves."""
    if math.prod(scores_BxN.shape) < NETWORK_MIN_SCORES:
        return lax.top_k(scores_BxN, k)[1]
    return lax.platform_dependent(scores_BxN, cpu=lambda x: network_top_k_ids(x, k),
                                  default=lambda x: lax.top_k(x, k)[1])


def network_top_k_ids(scores_BxN: jax.Array, k: int) -> jax.Array:
    """``top_k_ids`` by the sorting network, on any platform (its CPU path; tested against ``lax.top_k``)."""
    *batch, n = scores_BxN.shape
    if not 1 <= k <= n:
        raise ValueError(f"top_k_ids: k must be in 1…{n}, got {k}")
    rows = math.prod(batch)
    chunks = -(-rows // LANES)
    keys_LxN = _sortable(scores_BxN.reshape(rows, n))
    keys_LxN = jnp.pad(keys_LxN, ((0, chunks * LANES - rows), (0, 0)))
    keys_CxNxL = keys_LxN.reshape(chunks, LANES, n).transpose(0, 2, 1)  # rows on the lanes
    ids_CxKxL = lax.map(lambda keys_NxL: _top_k_lanes(keys_NxL, k), keys_CxNxL)
    return ids_CxKxL.transpose(0, 2, 1).reshape(chunks * LANES, k)[:rows].reshape(*batch, k)


def lanes_top_k_ids(scores_NxL: jax.Array, k: int) -> jax.Array:
    """Ids (int32, K×L) of the k best scores down each column (a row per candidate, a lane per problem), best
    first, with ``lax.top_k``'s order: the network without transposing, for callers that compute their scores
    with the problems on the last axis already (key_search's CPU path)."""
    n = scores_NxL.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"lanes_top_k_ids: k must be in 1…{n}, got {k}")
    return _top_k_lanes(_sortable(scores_NxL), k)


def _sortable(x):
    """float → int32 with the same order as lax.top_k's comparator (total order on the float bits)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _top_k_lanes(keys_NxL, k):
    n, lanes = keys_NxL.shape
    width = 1 << (k - 1).bit_length()  # K: the network's block
    ids_NxL = lax.broadcasted_iota(jnp.int32, (n, lanes), 0)
    group = math.isqrt(n // width) if n >= 4 * width else 1
    if group == 1:
        return _network(keys_NxL, ids_NxL, width)[1][:k]
    groups = -(-n // group)
    keys_GxSxL = _pad_rows(keys_NxL, groups * group, _MIN).reshape(groups, group, lanes)
    # the best `width` groups by their maximum, ties to the lower group (groups ≥ 2·width by the choice above)
    _, best_KxL = _network(keys_GxSxL.max(axis=1), lax.broadcasted_iota(jnp.int32, (groups, lanes), 0), width)
    cand_keys = take_along(keys_GxSxL, best_KxL[:, None, :], axis=0).reshape(width * group, lanes)
    cand_ids = (best_KxL[:, None, :] * group + lax.broadcasted_iota(jnp.int32, (1, group, 1), 1)).reshape(
        width * group, lanes)
    return _network(cand_keys, cand_ids, width)[1][:k]


def _pad_rows(x, rows, value):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)), constant_values=value)


def _network(keys_NxL, ids_NxL, width):
    """The ``width`` best (key, id) pairs along axis 0, sorted: key descending, then id ascending."""
    n, lanes = keys_NxL.shape
    blocks = -(-n // width)
    pad = blocks * width - n
    # padding loses to every real entry: the lowest key, and ids above every real id
    keys = _pad_rows(keys_NxL, n + pad, _MIN).reshape(blocks, width, lanes)
    ids = jnp.concatenate([ids_NxL, jnp.iinfo(jnp.int32).max - lax.broadcasted_iota(jnp.int32, (pad, lanes), 0)]
                          ).reshape(blocks, width, lanes)
    size = 2
    while size <= width:  # bitonic sort of every block: a flip, then half-cleaners
        keys, ids = _flip(keys, ids, size)
        keys, ids = _half_cleaners(keys, ids, size // 4)
        size *= 2
    while keys.shape[0] > 1:  # merge blocks pairwise, keeping the better half
        if keys.shape[0] % 2:
            keys = jnp.concatenate([keys, jnp.full((1, width, lanes), _MIN, jnp.int32)])
            ids = jnp.concatenate([ids, jnp.full((1, width, lanes), jnp.iinfo(jnp.int32).max, jnp.int32)])
        # block a sorted down, block b reversed (sorted up): the elementwise better of the two is a bitonic
        # sequence holding the best `width` of both
        (keys, ids), _ = _compare_swap(keys[0::2], ids[0::2], keys[1::2, ::-1], ids[1::2, ::-1], both=False)
        keys, ids = _half_cleaners(keys, ids, width // 2)
    return keys[0], ids[0]


def _compare_swap(ka, ia, kb, ib, both=True):
    """(better, worse) of the pairs (ka, ia), (kb, ib), elementwise."""
    a_first = (ka > kb) | ((ka == kb) & (ia < ib))
    better = (jnp.where(a_first, ka, kb), jnp.where(a_first, ia, ib))
    return better, ((jnp.where(a_first, kb, ka), jnp.where(a_first, ib, ia)) if both else None)


def _flip(keys, ids, size):
    """Compare i with size-1-i inside every run of ``size``: two sorted halves become a bitonic split."""
    B, W, L = keys.shape
    k4, i4 = keys.reshape(B, W // size, size, L), ids.reshape(B, W // size, size, L)
    h = size // 2
    (bk, bi), (wk, wi) = _compare_swap(k4[:, :, :h], i4[:, :, :h], k4[:, :, h:][:, :, ::-1], i4[:, :, h:][:, :, ::-1])
    return (jnp.concatenate([bk, wk[:, :, ::-1]], 2).reshape(B, W, L),
            jnp.concatenate([bi, wi[:, :, ::-1]], 2).reshape(B, W, L))


def _half_cleaners(keys, ids, stride):
    """Compare i with i + stride for stride, stride/2, …, 1: sorts every bitonic run of 2·stride."""
    B, W, L = keys.shape
    while stride >= 1:
        k5, i5 = keys.reshape(B, W // (2 * stride), 2, stride, L), ids.reshape(B, W // (2 * stride), 2, stride, L)
        (bk, bi), (wk, wi) = _compare_swap(k5[:, :, 0], i5[:, :, 0], k5[:, :, 1], i5[:, :, 1])
        keys, ids = jnp.stack([bk, wk], 2).reshape(B, W, L), jnp.stack([bi, wi], 2).reshape(B, W, L)
        stride //= 2
    return keys, ids
