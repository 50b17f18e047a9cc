"""Benchmark c: dense vs MoE vs UltraMem (V1, V2) and Memory+ at matched activated parameters, trained on the same
tokens, over seeds.

    python benchmarks/quality.py                      # quick: 400 steps x 16 x 128 tokens, seeds 0,1,2 (2 CPU cores)
    python benchmarks/quality.py --full               # 4000 steps x 32 x 256 tokens (hours on CPU, minutes on a GPU)
    python benchmarks/quality.py --dataset my.txt     # any train.py data.dataset (files, globs, a prepared dir)
    python benchmarks/quality.py --steps 1600         # a longer quick budget

Writes docs/results/quality[-full][-<dataset>][-<steps>].md (validation losses: mean and spread over seeds, each
seed's gap to the activated-matched dense model) and a .png of the loss curves (seed 0). For a given seed every
model sees the same batches in the same order (the seed sets model init and data order). Runs live under
runs/bench/, named by their resolved config, and are reused when identical (ladder.py shares them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from ultramem_jax.params import param_counts  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402

MODELS = [("UltraMem-x12", "tiny-x12"), ("UltraMemV2", "tiny-v2"), ("Memory+", "tiny-memplus"),
          ("MoE-2in24", "tiny-moe-2in24"), ("dense", "tiny-dense"), ("dense, wide FFN", "tiny-dense-wide")]
REFERENCE = "dense, wide FFN"  # same activated parameters as UltraMem-x12 and MoE-2in24


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=0, help="override the mode's step count")
    p.add_argument("--dataset", default="", help="train.py data.dataset (default: the GCIDE dictionary, bytes)")
    p.add_argument("--models", default="", help="comma-separated presets to run (default: all six)")
    p.add_argument("--first-seed-only", default="", help="comma-separated presets run on the first seed only "
                   "(a cheaper table: e.g. the backbone-only dense model)")
    p.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench"))
    args = p.parse_args(argv)
    steps, batch, seq = (4000, 32, 256) if args.full else (400, 16, 128)
    steps = args.steps or steps
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        common.fail(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    data = args.dataset or common.gcide()
    models = [m for m in MODELS if not args.models or m[1] in args.models.split(",")]
    shared = common.train_overrides(data, steps, batch, seq, args.full, evals=4, logs=40)
    runs = {}
    once = set(filter(None, args.first_seed_only.split(",")))
    for seed in seeds:
        for label, preset in models:
            if preset in once and seed != seeds[0]:
                continue
            run = common.train_run(None, [f"model_name={preset}", *shared, f"seed={seed}"], args.out, reuse=True)
            runs.setdefault(label, []).append(run)
            print(f"{label} seed {seed}: val {run['val_loss']:.4f} ({run['seconds']:.0f} s)", flush=True)
        report(models, runs, seeds, steps, batch, seq, args, data)  # after every seed: a cut-off run keeps its results
    return 0


def report(models, runs, seeds, steps, batch, seq, args, data):
    ref = runs.get(REFERENCE)
    rows = []
    for label, preset in models:
        if label not in runs:
            continue
        cfg = load_config([f"model_name={preset}"]).model
        counts = param_counts(cfg)
        done = len(runs[label]) if ref is None else min(len(runs[label]), len(ref))
        losses = [r["val_loss"] for r in runs[label][:done]]
        mean = statistics.fmean(losses)
        spread = (max(losses) - min(losses)) / 2
        gaps = [] if ref is None else [a - b for a, b in zip(losses, [r["val_loss"] for r in ref[:done]])]
        rows.append([label, preset, f"{counts['total'] / 1e6:.2f}M", f"{counts['activated_per_token'] / 1e6:.2f}M",
                     f"{mean:.4f} ± {spread:.4f}", " ".join(f"{x:.4f}" for x in losses),
                     "" if label == REFERENCE or not gaps else f"{statistics.fmean(gaps):+.4f} ("
                     + ", ".join(f"{g:+.4f}" for g in gaps) + ")",
                     f"{statistics.fmean(r['seconds'] for r in runs[label][:done]):.0f}",
                     ",".join(map(str, seeds[:done]))])
    tokens = steps * batch * seq
    name = os.path.basename(data.rstrip("/"))
    suffix = ("-full" if args.full else "") + ("-" + common.slug(name) if args.dataset else "") + \
        (f"-{steps}" if args.steps else "")
    command = "python benchmarks/quality.py" + "".join(
        f" {flag} {val}" for flag, val in (("--seeds", args.seeds), ("--steps", args.steps or ""),
                                             ("--dataset", args.dataset), ("--models", args.models),
                                             ("--first-seed-only", args.first_seed_only)) if val) + \
        (" --full" if args.full else "")
    common.write_table(os.path.join(common.RESULTS, f"quality{suffix}.md"),
                       "Benchmark c: quality at matched activated size",
                       [f"Device: {common.device_line()}. Data: {name} (byte tokens unless the dataset says "
                        f"otherwise); {steps} steps x {batch} x {seq} = {tokens / 1e6:.1f}M tokens per run, same "
                        f"batches for every model of a seed; validation loss in nats per token on "
                        f"{'the whole' if args.full else '40 batches of the'} held-out split. Per model: mean ± "
                        f"half the range over its seeds, every seed's value, and every seed's gap to the activated-matched dense model (negative: better). Command: `{command}`."],
                       ["model", "preset", "total params", "activated / token", "val loss", "per seed",
                        f"vs {REFERENCE} (per seed)", "wall s", "seeds"], rows)
    series = {label: tuple(zip(*runs[label][0]["train_curve"])) for label, _ in models if label in runs}
    common.plot(os.path.join(common.RESULTS, f"quality{suffix}.png"),
                f"Training loss ({name}, {steps} steps, seed {seeds[0]})", "step", "train cross-entropy (nats)",
                series)


if __name__ == "__main__":
    sys.exit(main())
