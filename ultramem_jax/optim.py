"""Optimizer: AdamW with the paper's schedule, and the value-table learning-rate multiplier (notes A.8).

Value LR ("value lr decay", the largest single gain of the paper's ablation):
    lr_value(step) = lr(step) · (1 + (M − 1) · max(0, 1 − step / (T · decay_frac)))
M = 4 in the released code (10 in secondary sources); decay_frac = 1 decays over the whole run.
The value tables are found by name (every memory layer's ``values``) and get their own AdamW, whose
treatment can follow the other reference systems by config (docs/results.md has the measurements):
  value_learning_rate > 0   a constant value LR after the warm-up, outside the cosine (Memory Layers at Scale
                            and PKM train values at a constant 1e-3); the multiplier then does not apply
  value_grad_clip > 0       value tables clipped by their own global norm, the rest by grad_clip (Meta clips
                            the two separately, so a loud table cannot shrink the backbone's updates)
  value_b2, value_weight_decay   the values' own Adam β₂ and weight decay (None: the shared ones)
  value_update              dense: optax AdamW over the whole table (its gradient built at N × D_v every step);
                            sparse: only the rows a step touched are read and written (row_adam.py), on dense
                            AdamW's trajectory up to rounding (a row's skipped steps applied, in row_adam's
                            interpolated closed form, when a lookup reads it, when it is next updated and at
                            flush); lazy: plain lazy
                            AdamW (untouched rows and their moments stand still, and are read as they are).  Every memory layout (each
                            table shard updates its own rows or columns: value_rows.py) and every value table:
                            V1 / PKM layers' own, UltraMemV2's shared pre-values and values, Memory+'s shared
                            pool (the reads of all layers summed into one row update per table and step).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ultramem_jax import row_adam

VALUE_UPDATES = ("dense", "sparse", "lazy")

@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4  # peak
    warmup_frac: float = 0.01  # of total steps
    final_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to every parameter, value tables included (released code)
    grad_clip: float = 1.0  # global norm; 0 disables
    value_lr_multiplier: float = 4.0  # M
    value_lr_decay_frac: float = 1.0  # the multiplier reaches 1 after this fraction of the run
    # > 0 (our default, docs/results.md §1): constant value LR after the warm-up, as Memory+ and PKM train values;
    # 0: the paper's schedule × the decaying multiplier below
    value_learning_rate: float = 1e-3
    value_grad_clip: float = 0.0  # > 0: clip value-table gradients by their own global norm (0: one global clip)
    value_b2: float | None = None  # Adam β₂ of the value tables; None: b2
    value_weight_decay: float | None = None  # weight decay of the value tables; None: weight_decay
    value_update: str = "dense"  # dense | sparse | lazy (see the module docstring)

    def __post_init__(self):
        checks = {"learning_rate": self.learning_rate > 0, "warmup_frac": 0 <= self.warmup_frac < 1,
                  "final_lr_ratio": 0 <= self.final_lr_ratio <= 1, "b1": 0 <= self.b1 < 1, "b2": 0 <= self.b2 < 1,
                  "eps": self.eps > 0, "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip >= 0,
                  "value_lr_multiplier": self.value_lr_multiplier >= 1,
                  "value_lr_decay_frac": self.value_lr_decay_frac > 0,
                  "value_learning_rate": self.value_learning_rate >= 0, "value_grad_clip": self.value_grad_clip >= 0,
                  "value_b2": self.value_b2 is None or 0 <= self.value_b2 < 1,
                  "value_weight_decay": self.value_weight_decay is None or self.value_weight_decay >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"optim.{name}: out of range ({getattr(self, name)!r})")
        if self.value_update not in VALUE_UPDATES:
            raise ValueError(f"optim.value_update: must be one of {list(VALUE_UPDATES)}, got {self.value_update!r}")
        if self.value_update == "sparse":
            row_adam.horizon(self.b1, self.resolved_value_b2)

    @property
    def resolved_value_b2(self) -> float:
        return self.b2 if self.value_b2 is None else self.value_b2

    @property
    def resolved_value_weight_decay(self) -> float:
        return self.weight_decay if self.value_weight_decay is None else self.value_weight_decay

    @property
    def sparse_values(self) -> bool:
        return self.value_update != "dense"


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = max(1, int(cfg.warmup_frac * total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1),
                                              end_value=cfg.learning_rate * cfg.final_lr_ratio)


def value_lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    if cfg.value_learning_rate > 0:
        warmup = max(1, int(cfg.warmup_frac * total_steps))
        return optax.linear_schedule(0.0, cfg.value_learning_rate, warmup)
    base = lr_schedule(cfg, total_steps)
    horizon = max(1.0, cfg.value_lr_decay_frac * total_steps)

    def schedule(step):
        boost = 1.0 + (cfg.value_lr_multiplier - 1.0) * jnp.maximum(0.0, 1.0 - step / horizon)
        return base(step) * boost

    return schedule


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def param_labels(params):
    """'values' for the memory value tables (UltraMemV2's pre-value tables too, as its release groups them),
    'other' for everything else."""
    def label(path, _):
        names = _path_names(path)
        return "values" if "values" in names or "pre_values" in names else "other"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation of every parameter; with sparse value updates, of every parameter but the value
    tables (row_adam updates those, and a joint clip is then the train step's: ``clip_factor``)."""
    def adamw(schedule, b2, weight_decay, clip):
        opt = optax.adamw(schedule, b1=cfg.b1, b2=b2, eps=cfg.eps, weight_decay=weight_decay)
        return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt

    separate = cfg.value_grad_clip > 0  # otherwise one clip over every gradient, as the released code does
    values = adamw(value_lr_schedule(cfg, total_steps), cfg.resolved_value_b2, cfg.resolved_value_weight_decay,
                   cfg.value_grad_clip if separate else 0.0)
    other = adamw(lr_schedule(cfg, total_steps), cfg.b2, cfg.weight_decay, cfg.grad_clip if separate else 0.0)
    if cfg.sparse_values:
        return other
    parts = [] if separate or cfg.grad_clip <= 0 else [optax.clip_by_global_norm(cfg.grad_clip)]
    parts.append(optax.multi_transform({"values": values, "other": other}, param_labels))
    return optax.chain(*parts)


def value_row_hyper(cfg: OptimConfig, total_steps: int) -> row_adam.Hyper:
    """The value tables' row-sparse AdamW: the same schedule, β's, ε and weight decay as the dense one."""
    return row_adam.Hyper(value_lr_schedule(cfg, total_steps), total_steps, cfg.b1, cfg.resolved_value_b2, cfg.eps,
                          cfg.resolved_value_weight_decay, cfg.value_update, cfg.grad_clip, cfg.value_grad_clip)


def clip_factor(norm, max_norm: float):
    """What ``optax.clip_by_global_norm(max_norm)`` multiplies the gradients by, given their global norm."""
    if max_norm <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.where(norm < max_norm, 1.0, max_norm / norm).astype(jnp.float32)
