"""The run configuration: YAML files plus ``key=value`` overrides, validated against a typed schema.

Precedence (MaxText style): ``configs/base.yml`` < ``configs/models/<model_name>.yml`` < the YAML file named
on the command line (and the files its ``base_config`` names) < ``key=value`` overrides.  Nested keys use dots:
``model.memory.topk=8``.  Anything unknown or ill-typed fails with one line naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import re

import yaml

from ultramem_jax.config import ModelConfig, from_dict
from ultramem_jax.errors import UsageError
from ultramem_jax.optim import OptimConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 minus its base-60 numbers: ``memory_placement: 1:3`` (and the override ``model.memory_placement=1:3``)
    is the string "1:3", not the integer 63, as in YAML 1.2."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in (
    "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?[0-9][0-9_]*(?:[eE][-+]?[0-9]+)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "kjv"  # "kjv" (built-in demo corpus), or files / globs / a prepared dir, comma-separated
    format: str = "auto"  # auto | text | jsonl | prepared
    jsonl_field: str = "text"  # the field of each jsonl record that holds the document
    decode_errors: str = "strict"  # strict: non-UTF-8 bytes are an error | replace: read them as U+FFFD
    tokenizer: str = "byte"  # byte | bpe (train one on the corpus) | path/to/tokenizer.json
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.02  # documents held out for validation, chosen by a fixed seed
    val_dataset: str = ""  # files / globs / a prepared dir for validation instead of holding out val_fraction
    num_threads: int = 2  # grain reader threads
    prefetch: int = 8  # grain prefetch buffer, in batches

    def __post_init__(self):
        if self.format not in ("auto", "text", "jsonl", "prepared"):
            raise ValueError(f"data.format: must be auto, text, jsonl or prepared, got {self.format!r}")
        if self.decode_errors not in ("strict", "replace"):
            raise ValueError(f"data.decode_errors: must be strict or replace, got {self.decode_errors!r}")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"data.val_fraction: must be in (0, 0.5), got {self.val_fraction}")
        if self.bpe_vocab_size < 260:
            raise ValueError(f"data.bpe_vocab_size: must be >= 260, got {self.bpe_vocab_size}")
        if not self.dataset.strip():
            raise ValueError("data.dataset: empty")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model_name: str = "tiny"  # preset under configs/models/
    output_dir: str = "runs/tiny"  # checkpoints, metrics.jsonl, TensorBoard events, config.json
    steps: int = 1500
    seed: int = 0
    batch_size: int = 16  # global, in sequences
    seq_len: int = 128
    log_every: int = 50
    eval_every: int = 500  # 0: only at the end
    eval_batches: int = 0  # 0: the whole validation split
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    distributed: str = "auto"  # auto | on | off: jax.distributed.initialize() for multi-host runs
    mesh: dict[str, int] = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    logical_axis_rules: list = dataclasses.field(default_factory=list)  # [[logical, mesh axes], ...]
    sharding: str = ""  # a layout file (configs/sharding/*.yml) merged over the preset
    memory_layout: dict[str, list] = dataclasses.field(default_factory=dict)  # {rows: [axes], cols: [axes]}
    peak_tflops: float = 0.0  # per device, for MFU; 0: known accelerators, or a measured matmul on CPU
    resume_override: str = ""  # comma-separated keys a resume may change although they alter the run's meaning
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.distributed not in ("auto", "on", "off"):
            raise ValueError(f"distributed: must be auto, on or off, got {self.distributed!r}")
        if not self.output_dir:
            raise ValueError("output_dir: empty")
        sizes = list(self.mesh.values())
        if sum(1 for s in sizes if s == -1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh: sizes must be positive with at most one -1, got {self.mesh}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml_load(f) or {}
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys")
    base = data.pop("base_config", None)
    if base:
        parent = _read_yaml(base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base))
        data = _merge(parent, data)
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any):
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise UsageError(f"{dotted}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> tuple[str | None, dict]:
    """``[CONFIG.yml] key=value ...`` → (config path or None, nested override dict)."""
    path, overrides = None, {}
    for i, arg in enumerate(args):
        if "=" not in arg:
            if i == 0 and arg.endswith((".yml", ".yaml")):
                path = arg
                continue
            raise UsageError(f"argument {arg!r} is neither a config file (first, .yml) nor key=value")
        key, raw = arg.split("=", 1)
        if not key:
            raise UsageError(f"argument {arg!r} has an empty key")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(overrides, key, value)
    return path, overrides


def load_config(args: list[str]) -> TrainConfig:
    path, overrides = parse_overrides(args)
    base = _read_yaml(os.path.join(CONFIG_DIR, "base.yml"))
    user = _read_yaml(path) if path else {}
    head = _merge(_merge(base, user), overrides)
    model_name = head.get("model_name", "tiny")
    preset_path = os.path.join(CONFIG_DIR, "models", f"{model_name}.yml")
    if not os.path.exists(preset_path):
        known = sorted(f[:-4] for f in os.listdir(os.path.join(CONFIG_DIR, "models")) if f.endswith(".yml"))
        raise UsageError(f"model_name: unknown preset {model_name!r} (known: {', '.join(known)})")
    preset = _read_yaml(preset_path)
    layout_path = head.get("sharding") or _merge(base, preset).get("sharding") or ""
    layout = {}
    if layout_path:
        if not os.path.exists(layout_path) and os.path.exists(os.path.join(CONFIG_DIR, "sharding", layout_path)):
            layout_path = os.path.join(CONFIG_DIR, "sharding", layout_path)
        layout = _read_yaml(layout_path)
        bad = set(layout) - {"memory_layout", "logical_axis_rules", "mesh", "description"}
        if bad:
            raise UsageError(f"sharding file {layout_path}: unknown key {sorted(bad)[0]!r} "
                             "(known: memory_layout, logical_axis_rules, mesh, description)")
        layout.pop("description", None)
    merged = _merge(_merge(_merge(_merge(base, preset), layout), user), overrides)
    try:
        return from_dict(TrainConfig, merged)
    except ValueError as e:
        raise UsageError(str(e)) from None


# What a resume may change: how the run is watched, saved and laid out on devices, not what it computes.
# (Checkpoints restore onto any mesh; a layout change only reorders floating-point sums.)
RESUME_MAY_CHANGE = ("output_dir", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                     "async_checkpointing", "distributed", "mesh", "logical_axis_rules", "sharding", "memory_layout",
                     "peak_tflops", "resume_override", "data.num_threads", "data.prefetch", "model.memory.kernels",
                     "model.moe.grouped_matmul")


def config_fingerprint(cfg: TrainConfig) -> dict:
    """What a resume must agree with: every key but RESUME_MAY_CHANGE (data, seed, steps, optimizer, model, ...).
    The step count is in it because the LR schedule spans it, the data keys because the saved iterator position
    indexes that data."""
    tree = json.loads(json.dumps(cfg.to_dict()))
    for key in RESUME_MAY_CHANGE:
        *parents, last = key.split(".")
        node = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def resume_overrides(cfg: TrainConfig) -> tuple[str, ...]:
    """The keys of ``resume_override``, checked: a model key cannot be overridden (the checkpoint's arrays have
    the model's shapes)."""
    keys = tuple(k.strip() for k in cfg.resume_override.split(",") if k.strip())
    flat = _flatten(config_fingerprint(cfg))
    for k in keys:
        if k == "model" or k.startswith("model."):
            raise UsageError(f"resume_override: {k} cannot be overridden (the checkpoint fixes the model); use "
                             "another output_dir")
        if not any(f == k or f.startswith(k + ".") for f in flat):
            raise UsageError(f"resume_override: {k!r} is not a key a resume checks (may change freely: "
                             f"{', '.join(RESUME_MAY_CHANGE)})")
    return keys


def _flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out
