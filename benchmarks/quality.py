"""Benchmark c: dense vs MoE vs UltraMem at matched activated parameters, trained on the same GCIDE tokens.

    python benchmarks/quality.py            # quick: 400 steps x 16 x 128 tokens each (~10 min on 2 CPU cores)
    python benchmarks/quality.py --full     # 4000 steps x 32 x 256 tokens (0.84 epoch; hours on CPU, minutes on a GPU)

Writes docs/results/quality[-full].md (validation losses) and quality[-full].png (loss curves).  Every model sees
the same batches in the same order (same seed, same data pipeline) and less than one epoch of the corpus.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from ultramem_jax.params import param_counts  # noqa: E402
from ultramem_jax.train_config import load_config  # noqa: E402

MODELS = [("UltraMem-x12", "tiny-x12"), ("MoE-2in24", "tiny-moe-2in24"), ("dense", "tiny-dense"),
          ("dense, wide FFN", "tiny-dense-wide")]


def report(rows, series, steps, batch, seq, full):
    tokens, suffix = steps * batch * seq, "-full" if full else ""
    common.write_table(os.path.join(common.RESULTS, f"quality{suffix}.md"),
                       "Benchmark c: quality at matched activated size",
                       [f"Device: {common.device_line()}. GCIDE (byte tokens, 38.9M train tokens); {steps} steps x "
                        f"{batch} x {seq} = {tokens / 1e6:.1f}M tokens ({tokens / 38.9e6:.2f} epoch), same batches for "
                        f"every model; validation loss in nats per byte on "
                        f"{'the whole' if full else '40 batches of the'} held-out split. Mode: "
                        f"{'full' if full else 'quick'}. Command: `python benchmarks/quality.py{' --full' if full else ''}`."],
                       ["model", "preset", "total params", "activated / token", "val loss", "wall s"], rows)
    common.plot(os.path.join(common.RESULTS, f"quality{suffix}.png"), f"Training loss (GCIDE, bytes, {steps} steps)",
                "step", "train cross-entropy (nats)", series)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-quality"))
    args = p.parse_args(argv)
    steps, batch, seq = (4000, 32, 256) if args.full else (400, 16, 128)
    data = common.gcide()
    shared = common.train_overrides(data, steps, batch, seq, args.full, evals=4, logs=40)
    rows, series = [], {}
    for label, preset in MODELS:
        cfg = load_config([f"model_name={preset}"]).model
        counts = param_counts(cfg)
        run = common.train_run(label, [f"model_name={preset}", *shared], args.out)
        rows.append([label, preset, f"{counts['total'] / 1e6:.2f}M", f"{counts['activated_per_token'] / 1e6:.2f}M",
                     f"{run['val_loss']:.4f}", f"{run['seconds']:.0f}"])
        series[label] = tuple(zip(*run["train_curve"]))
        print(f"{label}: val {run['val_loss']:.4f} ({run['seconds']:.0f} s)", flush=True)
        report(rows, series, steps, batch, seq, args.full)  # after every model: a cut-off run keeps its results
    return 0


if __name__ == "__main__":
    sys.exit(main())
