"""Evaluate a checkpoint: validation loss and perplexity, and optionally sample text from a prompt.

    python -m ultramem_jax.eval RUN_DIR [--step N] [--prompt TEXT] [--max-new-tokens 200] [key=value ...]

Only the ``params`` item is read, onto whatever devices this machine has (the run's mesh is not needed).
``key=value`` overrides the run's config for evaluation (e.g. ``data.dataset=other.jsonl eval_batches=10``);
the model part must stay as trained.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import jax
from flax import nnx

from ultramem_jax import data, generate, training
from ultramem_jax.checkpointing import Checkpointer, abstract_like
from ultramem_jax.config import from_dict
from ultramem_jax.errors import UsageError
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh
from ultramem_jax.platforms import skip_absent_tpu
from ultramem_jax.quiet import quiet_library_noise
from ultramem_jax.train_config import TrainConfig, _merge, parse_overrides
from ultramem_jax.transformer import create_model


def load_run(run_dir: str, step: int | None, overrides: list[str], devices=None):
    """(config, model with restored params, step, mesh, rules) for a run directory."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise UsageError(f"{run_dir} has no checkpoints/ directory")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    if not ckpt.steps():
        raise UsageError(f"no checkpoints in {ckpt_dir}")
    meta = None
    for s in ([step] if step in ckpt.steps() else []) + list(reversed(ckpt.steps())):
        try:
            meta = ckpt.read_meta(s)
            break
        except Exception:
            continue
    if meta is None or "config" not in meta:
        raise UsageError(f"no checkpoint in {ckpt_dir} has readable metadata")
    _, over = parse_overrides(overrides)
    if "model" in over:
        raise UsageError("model.* cannot be overridden at evaluation: the checkpoint fixes the model")
    try:
        cfg = from_dict(TrainConfig, _merge(meta["config"], over))
    except ValueError as e:
        raise UsageError(str(e)) from None
    mesh = make_mesh({"data": -1}, devices)  # whatever devices are here; parameters replicated
    rules = logical_rules([], mesh)
    model = create_model(cfg.model, seed=cfg.seed, mesh=mesh, rules=rules)
    model_def, model_state = nnx.split(model)
    restored_step, params, _ = ckpt.restore_params(abstract_like(model_state), step)
    return cfg, nnx.merge(model_def, params), restored_step, mesh, rules


def validation_loss(cfg, model, mesh, rules, corpus) -> tuple[float, int]:
    model_def, model_state = nnx.split(model)
    return training.validation_loss(training.make_eval_step(model_def, mesh), model_state, corpus.val, cfg,
                                    batch_sharding(mesh, rules))


def memory_report(cfg, model, mesh, rules, corpus, batches: int = 8) -> str:
    """The memory-health statistics train.py logs, measured on validation batches, one line per layer."""
    model_def, model_state = nnx.split(model)
    r = training.memory_health_report(model_def, model_state, corpus.val, cfg, batch_sharding(mesh, rules), batches)
    lines = [f"memory health over {batches} validation batches (out/stream: memory output RMS / residual RMS "
             f"where it is added; H: entropy of the reads over rows / log N)"]
    for k in range(cfg.model.num_memory_layers):
        g = lambda name: r.get(f"mem{k}/{name}", float("nan"))  # noqa: E731
        lines.append(f"  mem{k}: out/stream {g('out_rms') / g('resid_rms'):.3f} (out {g('out_rms'):.4f}, stream "
                     f"{g('resid_rms'):.4f}) | top1 {g('top1_score'):.3f} topm {g('topm_score'):.3f} | rows used "
                     f"{g('usage'):.1%} H {g('usage_entropy'):.3f}")
    return "\n".join(lines)


def eval_corpus(cfg, run_dir: str, overrides: list[str], need_val: bool):
    """The tokenizer and validation tokens saved with the run, unless ``data.*`` is overridden (or the run predates
    them): then the configured data."""
    _, over = parse_overrides(overrides)
    saved = None if "data" in over else data.load_run_corpus(run_dir)
    if saved is not None and (saved.val is not None or not need_val):
        return saved
    return data.load_corpus(cfg.data, run_dir)


def main(argv=None) -> int:
    skip_absent_tpu()
    quiet_library_noise()
    p = argparse.ArgumentParser(prog="python -m ultramem_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the output_dir of a training run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    p.add_argument("--prompt", default=None, help="sample a continuation of this text (KV-cached, streamed; "
                   "python -m ultramem_jax.generate has every option)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--no-loss", action="store_true", help="skip the validation pass")
    p.add_argument("--no-health", action="store_true", help="skip the memory-health report")
    args, rest = p.parse_known_args(argv)
    try:
        cfg, model, step, mesh, rules = load_run(args.run_dir, args.step, rest)
        corpus = eval_corpus(cfg, args.run_dir, rest, need_val=not args.no_loss)
        if not args.no_loss:
            loss, count = validation_loss(cfg, model, mesh, rules, corpus)
            print(f"step {step} | val_loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f} | {count:,} tokens | "
                  f"{len(jax.devices())} {jax.devices()[0].platform} device(s)")
        if cfg.model.num_memory_layers and not args.no_health and getattr(corpus, "val", None) is not None:
            print(memory_report(cfg, model, mesh, rules, corpus))
        if args.prompt is not None:
            generate.run_prompts(model, corpus.tokenizer, [args.prompt], context=cfg.seq_len,
                                 max_new_tokens=args.max_new_tokens,
                                 sampling=generate.Sampling(args.temperature, args.top_k, seed=cfg.seed))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
