"""Typed, validated configuration of the model: the memory layer and the transformer around it.

Every invalid value raises ``ValueError`` whose message starts with the dotted field name
(``memory.topk: ...``), so a user sees which knob to fix.  ``from_dict`` rejects unknown keys the same way.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from ultramem_jax.placement import parse_placement


def _fail(field: str, msg: str):
    raise ValueError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """One memory layer (UltraMem V1 defaults; see docs/ultramem-method.md A.9).

    The knobs that the paper and the released code disagree on are choices here (method notes, section F).
    ``kind: ultramemv2`` is UltraMemV2 (memory_v2.py; ``MemoryConfig.ultramemv2()`` has its defaults): the
    fields below marked V2 apply to it only, and ``num_keys`` is then n₀, the keys per side of one *layer's
    share* of the value table shared by all memory layers (Table 10's "knum").  ``kind: memplus`` is Meta's
    Memory+ (memory_plus.py; ``MemoryConfig.memplus()``): product keys over one value pool of num_keys² rows
    that every memory layer reads, swilu gating, in place of the FFN of the blocks it sits in.
    """

    kind: Literal["ultramem", "pkm", "ultramemv2", "memplus"] = "ultramem"
    num_keys: int = 64  # n: physical keys per side, N = n² value rows (V2: n₀, see share_ratio)
    key_dim: int | None = None  # D_k per side; None: d_model // 4
    value_dim: int | None = None  # D_v; None: d_model // 2 (UltraMem) or d_model (PKM)
    heads: int = 2  # H retrieval heads
    topk: int = 32  # m: values selected per head
    preselect: int | None = None  # m_pre: rows/cols kept by the pre-selection; None: topk
    retrieval: Literal["tdqkr", "product_key"] = "tdqkr"
    rank: int = 2  # r: Tucker rank
    cores: int = 2  # h: Multi-Core Scoring cores
    expansion: int = 4  # E: implicit value expansion (perfect square)
    shuffle: bool = True  # random virtual->physical permutation for IVE
    share_query: bool = True  # all heads use one query (UltraMem) or one each (PKM)
    qk_norm: bool = True  # RMSNorm on sub-queries and keys
    norm_eps: float = 1e-5  # epsilon of the query and key RMSNorms (released code: 1e-5)
    # BatchNorm on the query (PKM's option, for slot usage): none | past: normalise with the running statistics of
    # earlier steps only, then fold this batch in (no token sees another's query, so nothing leaks from the
    # future; eval and generation use the same statistics) | batch: PKM's, this batch's statistics (every
    # position sees the whole batch, future tokens included: kept to compare with, not for language models)
    query_batchnorm: Literal["none", "past", "batch"] = "none"
    # softmax: our default (docs/results.md §1); the paper and its released code use identity
    score_activation: Literal["identity", "softmax", "relu"] = "softmax"
    output_proj: bool = True  # project the E pooled D_v vectors to d_model
    # init std of the output projection: 0 (our default) starts the memory silent, as a residual branch;
    # None: (E·D_v)^-0.5 (released code)
    out_proj_std: float | None = 0.0
    output_scale: float = 1.0  # multiplies the memory's output (0: a diagnostic that must give the backbone)
    value_init: Literal["paper", "code", "pkm"] = "paper"  # N(0, E/(2mHL)) | N(0, 0.02²) | N(0, 1/D_v)
    norm_init: Literal["code", "paper"] = "code"  # D_k^-0.33 | query 1/sqrt(E[Y]), key 1/sqrt(D_k)
    aux_loss: bool = True  # Tucker singular-value penalty
    aux_alpha: float = 1e-3
    aux_tau: float = 0.15
    aux_reduction: Literal["paper", "code"] = "paper"  # sum over heads | mean over heads
    balance_loss: float = 0.0  # β of the row/column pre-selection balance loss (UltraMemV2 Eq. 19: 1e-3); 0: off
    seed: int = 0  # seeds the IVE permutation (a buffer, not a parameter)
    kernels: Literal["xla", "pallas", "native", "auto"] = "auto"  # search + gather: XLA ops, Pallas or C++ CPU
    # kernels (kernels.py)
    # ---- V2 only (kind: ultramemv2) ----
    pre_value_dim: int | None = None  # D_p of the pre-value rows P; None: value_dim
    query_per_rank: bool = True  # one query per side and Tucker rank (the paper); False: one per side (V1's)
    # one table of n₀²·table_layers rows (P and V) serves every memory layer; each layer reads a window of
    # ⌊√(n₀²·table_layers·share_ratio)⌋² rows of it (released code mem_share_ratio: 0.5)
    share_ratio: float = 0.5
    sharing: Literal["ring", "block"] = "ring"  # S_g-Ring: window starts at the layer's own table | S_g-Block
    table_layers: int = 0  # per-layer tables in the shared table; 0: one per memory layer of the model
    init_score_var: float = 0.0  # σ_s², the selected scores' variance in V2's init (Eq. 26) with value_init paper

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def is_v2(self) -> bool:
        return self.kind == "ultramemv2"

    @property
    def table_rows(self) -> int:
        """Rows of the value table: a layer's own (V1), or the one shared by all V2 layers (n₀²·table_layers)."""
        return self.num_keys * self.num_keys * (max(1, self.table_layers) if self.is_v2 else 1)

    @property
    def window_keys(self) -> int:
        """n: keys per side addressing the layer's rows (V2: ⌊√(table_rows·share_ratio)⌋, the released code's)."""
        if not self.is_v2:
            return self.num_keys
        return max(1, math.isqrt(int(self.table_rows * self.share_ratio + 1e-6)))

    @property
    def num_values(self) -> int:
        """N: the value rows one layer addresses (V1: its table; V2: its window of the shared table)."""
        return self.window_keys * self.window_keys

    @property
    def keys_per_side(self) -> int:
        """n' = sqrt(E)·n: the key grid addresses E·N virtual slots."""
        return math.isqrt(self.expansion) * self.window_keys

    @property
    def m_pre(self) -> int:
        return self.topk if self.preselect is None else self.preselect

    def resolved(self, d_model: int) -> "MemoryConfig":
        """Fills the sizes that default to a fraction of d_model."""
        key_dim = self.key_dim if self.key_dim is not None else max(1, d_model // 4)
        if self.value_dim is not None:
            value_dim = self.value_dim
        else:
            value_dim = d_model if self.kind in ("pkm", "memplus") else max(1, d_model // 2)
        pre_value_dim = self.pre_value_dim if self.pre_value_dim is not None or not self.is_v2 else value_dim
        return dataclasses.replace(self, key_dim=key_dim, value_dim=value_dim, pre_value_dim=pre_value_dim)

    def validate(self, d_model: int, prefix: str = "memory") -> None:
        c = self.resolved(d_model)
        f = lambda name: f"{prefix}.{name}"  # noqa: E731
        for name in ("num_keys", "key_dim", "value_dim", "heads", "topk", "rank", "cores", "expansion"):
            v = getattr(c, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(f(name), f"must be a positive integer, got {v!r}")
        self._validate_v2(c, f)  # before the sizes that V2's window (share_ratio, table_layers) decides
        if math.isqrt(c.expansion) ** 2 != c.expansion:
            _fail(f("expansion"), f"must be a perfect square (4, 9, 16, ...) so the key grid is square, got {c.expansion}")
        if c.m_pre > c.keys_per_side:
            name = "preselect" if self.preselect is not None else "topk"
            _fail(f(name), f"{c.m_pre} is larger than the keys per side (sqrt(expansion)·num_keys = {c.keys_per_side})")
        if c.topk > c.m_pre * c.m_pre:
            _fail(f("topk"), f"{c.topk} is larger than the {c.m_pre}x{c.m_pre} candidate grid of the pre-selection")
        if c.value_dim % c.cores:
            _fail(f("value_dim"), f"{c.value_dim} is not divisible by cores={c.cores} (MCS splits values into equal slices)")
        if c.retrieval == "product_key" and (c.rank != 1 or c.cores != 1):
            _fail(f("retrieval"), "product_key (additive PKM) scoring needs rank=1 and cores=1")
        if c.retrieval == "tdqkr" and c.aux_loss and c.rank < 2:
            _fail(f("aux_loss"), "the Tucker penalty acts on singular values 2..r and needs rank >= 2")
        if not c.output_proj and (c.expansion != 1 or c.value_dim != d_model):
            _fail(f("output_proj"), "can be off only with expansion=1 and value_dim == d_model")
        if c.kind in ("pkm", "memplus") and (c.retrieval != "product_key" or c.expansion != 1):
            _fail(f("kind"), f"{c.kind} means product_key retrieval without value expansion (expansion=1)")
        if not c.norm_eps > 0:
            _fail(f("norm_eps"), f"must be > 0, got {c.norm_eps}")
        if c.out_proj_std is not None and c.out_proj_std < 0:
            _fail(f("out_proj_std"), f"must be >= 0, got {c.out_proj_std}")
        if c.balance_loss < 0:
            _fail(f("balance_loss"), f"must be >= 0, got {c.balance_loss}")
        if c.aux_alpha < 0:
            _fail(f("aux_alpha"), f"must be >= 0, got {c.aux_alpha}")
        if c.kernels not in ("xla", "pallas", "native", "auto"):
            _fail(f("kernels"), f"must be one of ['xla', 'pallas', 'native', 'auto'], got {c.kernels!r}")
        if c.preselect is not None and c.preselect < 1:
            _fail(f("preselect"), f"must be a positive integer, got {c.preselect}")

    @staticmethod
    def _validate_v2(c: "MemoryConfig", f) -> None:
        if not c.is_v2:
            if c.pre_value_dim is not None:
                _fail(f("pre_value_dim"), "applies to kind ultramemv2 only")
            if c.kind == "memplus" and not c.output_proj:
                _fail(f("output_proj"), "memplus always projects its gated bag back to d_model (W_v)")
            return
        if isinstance(c.pre_value_dim, bool) or not isinstance(c.pre_value_dim, int) or c.pre_value_dim < 1:
            _fail(f("pre_value_dim"), f"must be a positive integer, got {c.pre_value_dim!r}")
        if not 0 < c.share_ratio <= 1:
            _fail(f("share_ratio"), f"must be in (0, 1] (the share of the shared table a layer reads), "
                  f"got {c.share_ratio}")
        if isinstance(c.table_layers, bool) or not isinstance(c.table_layers, int) or c.table_layers < 0:
            _fail(f("table_layers"), f"must be an integer >= 0 (0: one per memory layer), got {c.table_layers!r}")
        if not c.output_proj:
            _fail(f("output_proj"), "ultramemv2 always projects D_v -> d_model (its single projector)")
        if c.value_init == "pkm":
            _fail(f("value_init"), "ultramemv2 takes paper (Eq. 26) or code (0.02)")
        if c.init_score_var < 0:
            _fail(f("init_score_var"), f"must be >= 0, got {c.init_score_var}")
        if c.query_batchnorm != "none":
            _fail(f("query_batchnorm"), "is a PKM option; ultramemv2 RMS-normalises its queries")

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def pkm(cls, **overrides) -> "MemoryConfig":
        """The original product-key memory (Lample et al. 2019): additive scores, softmax, one query per head."""
        base = dict(kind="pkm", heads=4, retrieval="product_key", rank=1, cores=1, expansion=1, shuffle=False,
                    share_query=False, qk_norm=False, score_activation="softmax", output_proj=False,
                    value_init="pkm", aux_loss=False)
        return cls(**{**base, **overrides})

    @classmethod
    def memplus(cls, **overrides) -> "MemoryConfig":
        """Memory+ (Meta, Memory Layers at Scale; anchors-2026.md §2.1): product keys, one query per head,
        softmax over each head's winners, values of width d_model in one pool shared by all memory layers,
        out = W_v(bag ⊙ silu(W_g x)); no q/k norm (Meta's public code; ``qk_norm: true`` is the option)."""
        base = dict(kind="memplus", heads=4, topk=32, retrieval="product_key", rank=1, cores=1, expansion=1,
                    shuffle=False, share_query=False, qk_norm=False, score_activation="softmax", out_proj_std=None,
                    value_init="pkm", aux_loss=False)
        return cls(**{**base, **overrides})

    @classmethod
    def ultramemv2(cls, **overrides) -> "MemoryConfig":
        """UltraMemV2 as in the paper and its released 227M command (anchors-2026.md §1.2–1.3): one head,
        no key expansion, D_p = D_v, raw scores, the Tucker penalty off, V2's init (Eq. 26), table shared
        by a 0.5 ring."""
        base = dict(kind="ultramemv2", heads=1, rank=2, cores=2, expansion=1, score_activation="identity",
                    out_proj_std=None, value_init="paper", aux_loss=False, share_ratio=0.5)
        return cls(**{**base, **overrides})


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE baseline's FFN (moe.py): every block's SwiGLU becomes X routed experts, k used per token."""

    num_experts: int = 8  # X
    top_k: int = 2  # k experts per token
    expert_mlp_dim: int | None = None  # SwiGLU inner width of one expert; None: the dense model's mlp_dim
    balance_weight: float = 0.01  # weight of the load-balancing loss
    normalize_top_k: bool = False  # renormalise the k routing weights to sum to 1 (Mixtral) or not (OLMoE)
    grouped_matmul: str = "auto"  # ragged (jax.lax.ragged_dot) | blocked (padded row blocks) | auto: blocked on CPU

    def validate(self, prefix: str = "moe") -> None:
        for name in ("num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{prefix}.{name}: must be a positive integer, got {v!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"{prefix}.top_k: {self.top_k} is more than num_experts={self.num_experts}")
        if self.expert_mlp_dim is not None and (not isinstance(self.expert_mlp_dim, int) or self.expert_mlp_dim < 1):
            raise ValueError(f"{prefix}.expert_mlp_dim: must be a positive integer, got {self.expert_mlp_dim!r}")
        if self.balance_weight < 0:
            raise ValueError(f"{prefix}.balance_weight: must be >= 0, got {self.balance_weight}")
        if self.grouped_matmul not in ("ragged", "blocked", "auto"):
            raise ValueError(f"{prefix}.grouped_matmul: must be one of ['ragged', 'blocked', 'auto'], "
                             f"got {self.grouped_matmul!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer (RMSNorm, RoPE, causal attention, SwiGLU) with optional memory layers."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int | None = None  # None: d_model // num_heads
    mlp_dim: int | None = None  # SwiGLU inner width; None: 8/3·d_model rounded up to a multiple of 64
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # activation dtype; params stay float32
    memory: MemoryConfig | None = None
    memory_placement: str = ""  # "x1:y1/x2:y2": memory reads block x's pre-FFN hidden, adds after block y
    moe: MoEConfig | None = None  # routed experts in place of every block's FFN (the MoE baseline)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_mlp_dim(self) -> int:
        return self.mlp_dim or -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def placement(self) -> list[tuple[int, int]]:
        return parse_placement(self.memory_placement, self.num_layers, field="memory_placement")

    @property
    def resolved_memory(self) -> MemoryConfig | None:
        """The memory config with its sizes filled (a V2 table spans one layer table per memory layer)."""
        if self.memory is None:
            return None
        mem = self.memory.resolved(self.d_model)
        if mem.is_v2 and mem.table_layers == 0:
            mem = dataclasses.replace(mem, table_layers=max(1, len(self.placement)))
        return mem

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(name, f"must be a positive integer, got {v!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            _fail("num_heads", f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.resolved_head_dim % 2:
            _fail("head_dim", f"RoPE needs an even head dimension, got {self.resolved_head_dim}")
        placement = self.placement  # validates the string
        if placement and self.memory is None:
            _fail("memory_placement", "memory layers are placed but no memory config is given")
        if self.memory is not None:
            if not placement:
                _fail("memory_placement", "a memory config is given but no memory layer is placed (e.g. '1:2')")
            self.resolved_memory.validate(self.d_model)
            if self.memory.kind == "memplus" and any(read != add for read, add in placement):
                _fail("memory_placement", "memplus replaces the FFN of the blocks it sits in: use 'i:i' entries "
                      "or 'all'")
            if self.memory.kind == "memplus" and self.moe is not None:
                _fail("moe", "memplus replaces FFNs; it does not combine with the MoE baseline")
        if self.moe is not None:
            self.moe.validate()

    @property
    def num_memory_layers(self) -> int:
        return len(self.placement)


# ---- dict / YAML construction ------------------------------------------------------------------------

def _check_type(field: str, value: Any, tp: Any) -> Any:
    """Checks ``value`` against a dataclass field annotation; returns the value (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(field, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(field, value, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{field}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            _fail(field, f"must be a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_check_type(f"{field}.{k}", k, key_tp): _check_type(f"{field}.{k}", v, val_tp)
                for k, v in value.items()}
    if tp is list or origin is list:
        if not isinstance(value, list):
            _fail(field, f"must be a list, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(field, f"must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=field)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(field, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(field, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(field, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(field, f"must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Builds dataclass ``cls`` from a plain dict, rejecting unknown keys and ill-typed values by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        field = f"{prefix}.{key}" if prefix else key
        if key not in names:
            _fail(field, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _check_type(field, value, hints[key])
    try:
        return cls(**kwargs)
    except ValueError as e:
        if prefix and not str(e).startswith(prefix):
            raise ValueError(f"{prefix}.{e}") from None
        raise
