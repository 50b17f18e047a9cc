"""Logical axis names carried by every parameter, and the context in which a model is built.

Parameters name their axes logically (``value_rows``, ``embed``, ...); a layout maps logical names to mesh
axes with ``nnx.logical_axis_rules``, so changing how tables are split never touches the model.
"""
from __future__ import annotations

import contextlib

import jax
from flax import nnx

# Dense model
VOCAB, EMBED, MLP, HEADS, HEAD_DIM, NORM = "vocab", "embed", "mlp", "heads", "head_dim", "norm"
# Memory layer
VALUE_ROWS = "value_rows"  # N physical value rows: split = number-wise (row) sharding
VALUE_DIM = "value_dim"  # D_v columns: split = dimension-wise (column) sharding
MEM_KEYS = "mem_keys"  # keys per side
MEM_HEADS = "mem_heads"
MEM_QUERY = "mem_query"  # query projection output
IVE_BLOCKS = "ive_blocks"
# MoE baseline
EXPERTS = "experts"  # split = expert parallelism

LOGICAL_AXES = (VOCAB, EMBED, MLP, HEADS, HEAD_DIM, NORM, VALUE_ROWS, VALUE_DIM, MEM_KEYS, MEM_HEADS, MEM_QUERY,
                IVE_BLOCKS, EXPERTS)


@contextlib.contextmanager
def build_context(mesh: jax.sharding.Mesh | None = None, rules=None):
    """Where parameters are created.

    With a mesh, parameters are created already sharded by ``rules`` (logical name → mesh axes).  Without
    one, they are plain single-device arrays that still carry their logical names as metadata.
    """
    if mesh is None:
        with nnx.use_eager_sharding(False):
            yield
        return
    with jax.set_mesh(mesh), nnx.logical_axis_rules(list(rules or [])):
        yield
