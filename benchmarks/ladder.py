"""The memory diagnostic ladder: why a memory helps or hurts at small scale, one rung per row, same batches.

    python benchmarks/ladder.py                     # every rung, seed 0, the quality benchmark's quick budget
    python benchmarks/ladder.py --only softmax,zero --seeds 0,1,2
    python benchmarks/ladder.py --dataset my.txt    # any train.py data.dataset (default: GCIDE bytes)

Each rung is tiny-x12 (or a baseline) with a few overrides on top of the shipped defaults; every rung sees the
same batches for a given seed (the seed sets model init and data order, as in train.py). Rows report the
validation loss (mean and spread over seeds), its gap to the activated-matched dense model, and memory health at
the end of training (memory output RMS / residual RMS where it is added, rows used in the last window, the
value-table gradient norm next to the rest). Runs are kept under runs/bench/ and reused by quality.py when their
resolved config is identical. Writes docs/results/ladder[-<dataset>].md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

M, O = "model.memory.", "optim."
# The paper's V1 recipe, whatever the shipped defaults are, on the two skip-layer memories of the first tiny-x12
# (288² rows each, key width 32, blocks 0 -> 1 and 2 -> 3); the rungs change one thing at a time from here.
PAPER = [M + "num_keys=288", M + "key_dim=32", M + "value_init=paper", M + "out_proj_std=null", M + "score_activation=identity", M + "norm_init=code",
         M + "balance_loss=0.0", M + "aux_loss=true", "model.memory_placement=0:1/2:3", O + "value_lr_multiplier=4.0",
         O + "value_learning_rate=0.0", O + "value_grad_clip=0.0", O + "value_b2=null",
         O + "value_weight_decay=null"]
SOFTMAX = PAPER + [M + "score_activation=softmax"]  # the best single change of the first pass
COMBINED = SOFTMAX + [M + "out_proj_std=0.0", O + "value_learning_rate=1e-3"]
# (group, label, preset, overrides), in the order they are run: the likeliest explanations first
RUNGS = [
    ("baseline", "dense (the backbone)", "tiny-dense", []),
    ("baseline", "dense, wide FFN (activated-matched)", "tiny-dense-wide", []),
    ("baseline", "UltraMem, the paper's V1 recipe", "tiny-x12", PAPER),
    ("output scale", "paper + zero-init output projection", "tiny-x12", PAPER + [M + "out_proj_std=0.0"]),
    ("output scale", "paper + softmax scores", "tiny-x12", SOFTMAX),
    ("output scale", "paper + value init 0.02 (released code)", "tiny-x12", PAPER + [M + "value_init=code"]),
    ("on softmax", "softmax + balance loss 0.01", "tiny-x12", SOFTMAX + [M + "balance_loss=0.01"]),
    ("on softmax", "softmax + constant value LR 1e-3", "tiny-x12", SOFTMAX + [O + "value_learning_rate=1e-3"]),
    ("on softmax", "softmax + zero-init output projection", "tiny-x12", SOFTMAX + [M + "out_proj_std=0.0"]),
    ("combined", "softmax + zero-init projection + constant value LR 1e-3", "tiny-x12", COMBINED),
    ("combined", "the same + a memory in every block (4 x 204^2 rows)", "tiny-x12",
     COMBINED + ["model.memory_placement=all", M + "num_keys=204"]),
    ("combined", "the same with key width 16 (activated-matched again)", "tiny-x12",
     COMBINED + ["model.memory_placement=all", M + "num_keys=204", M + "key_dim=16"]),
    ("wiring", "paper recipe, memory output x 0", "tiny-x12", PAPER + [M + "output_scale=0.0"]),
    ("on softmax", "softmax + separate value clipping", "tiny-x12", SOFTMAX + [O + "value_grad_clip=1.0"]),
    ("on softmax", "softmax + a memory in every block (4 x 204^2 rows)", "tiny-x12",
     SOFTMAX + ["model.memory_placement=all", M + "num_keys=204"]),
    ("on softmax", "softmax + a 4x smaller table (144^2 rows)", "tiny-x12", SOFTMAX + [M + "num_keys=144"]),
    ("output scale", "paper + relu scores", "tiny-x12", PAPER + [M + "score_activation=relu"]),
    ("optimizer", "paper + separate value clipping", "tiny-x12", PAPER + [O + "value_grad_clip=1.0"]),
    ("optimizer", "paper + constant value LR 1e-3", "tiny-x12", PAPER + [O + "value_learning_rate=1e-3"]),
    ("optimizer", "paper + value LR multiplier 1x", "tiny-x12", PAPER + [O + "value_lr_multiplier=1.0"]),
    ("usage", "paper + pre-selection balance loss 0.01", "tiny-x12", PAPER + [M + "balance_loss=0.01"]),
    ("output scale", "paper + output projection std 0.02/sqrt(2L)", "tiny-x12", PAPER + [M + "out_proj_std=0.00707"]),
    ("output scale", "paper + q/k-norm init from the paper", "tiny-x12", PAPER + [M + "norm_init=paper"]),
    ("optimizer", "paper + value beta2 0.999", "tiny-x12", PAPER + [O + "value_b2=0.999"]),
    ("optimizer", "paper + no value weight decay", "tiny-x12", PAPER + [O + "value_weight_decay=0.0"]),
    ("on defaults", "shipped defaults + query BatchNorm on past statistics", "tiny-x12",
     [M + "query_batchnorm=past"]),
    ("on defaults", "shipped defaults + a 4x smaller table (4 x 102^2 rows)", "tiny-x12", [M + "num_keys=102"]),
    ("on defaults", "shipped defaults + PKM value init N(0, 1/D_v)", "tiny-x12", [M + "value_init=pkm"]),
    ("baseline", "MoE 2 in 24 (total-matched)", "tiny-moe-2in24", []),
    ("baseline", "UltraMem, shipped defaults", "tiny-x12", []),
]


def run_rung(preset, overrides, seed, shared, out_root, cached_only=False):
    args = [f"model_name={preset}", *shared, f"seed={seed}", *overrides]
    if cached_only:
        return common.cached_run(args, out_root)
    return common.train_run(None, args, out_root, reuse=True)


def ratios(r) -> str:
    layers = sum(1 for k in r if k.endswith("/out_rms"))
    return ",".join(f"{r[f'mem{k}/out_rms'] / r[f'mem{k}/resid_rms']:.2f}" for k in range(layers))


def health(run) -> tuple[str, str, str, str]:
    r = run["last_train"]
    layers = sum(1 for k in r if k.endswith("/out_rms"))
    used = ",".join(f"{r[f'mem{k}/usage']:.0%}" for k in range(layers) if f"mem{k}/usage" in r)
    grads = f"{r['grad_norm_values']:.2f} / {r['grad_norm_other']:.2f}" if "grad_norm_values" in r else ""
    return ratios(run["first_train"]), ratios(r), used, grads


def mean_spread(xs):
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--only", default="", help="comma-separated substrings of rung labels (baselines always run)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dataset", default="", help="train.py data.dataset (default: GCIDE bytes)")
    p.add_argument("--cached", action="store_true", help="train nothing: tabulate the rungs already run")
    p.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = args.dataset or common.gcide()
    shared = common.train_overrides(data, args.steps, 16, 128, False, evals=4, logs=40)
    wanted = [w for w in args.only.split(",") if w]
    rungs = [r for r in RUNGS if not wanted or r[0] == "baseline" and "dense" in r[1] or
             any(w in r[1] for w in wanted)]
    results = {}
    for group, label, preset, overrides in rungs:
        runs = [run_rung(preset, overrides, s, shared, args.out, args.cached) for s in seeds]
        if not all(runs):
            continue
        results[label] = runs
        print(f"{label}: " + " ".join(f"{r['val_loss']:.4f}" for r in runs) + f" ({runs[0]['seconds']:.0f} s)",
              flush=True)
    ref = results.get("dense, wide FFN (activated-matched)")
    rows = []
    for group, label, preset, _ in rungs:
        if label not in results:
            continue
        runs = results[label]
        mean, spread = mean_spread([r["val_loss"] for r in runs])
        gap = "" if ref is None else "{:+.4f}".format(statistics.fmean(
            a["val_loss"] - b["val_loss"] for a, b in zip(runs, ref)))
        rows.append([group, label, f"{mean:.4f} ± {spread:.4f}" if len(runs) > 1 else f"{mean:.4f}", gap,
                     *health(runs[-1])])
    name = "ladder" + ("" if not args.dataset else "-" + common.slug(os.path.basename(args.dataset.rstrip("/"))))
    common.write_table(os.path.join(common.RESULTS, f"{name}.md"), "The memory diagnostic ladder",
                       [f"Device: {common.device_line()}. Data: {os.path.basename(data.rstrip('/'))}, {args.steps} "
                        f"steps x 16 x 128 byte tokens, seeds {args.seeds} (± is half the range over seeds); every row "
                        f"sees the same batches per seed. Health columns are from the last logged window of the "
                        f"last seed (and, for out/stream, also the first window, steps 1-10): memory output RMS / "
                        f"residual RMS per memory layer, value rows read in the window, and the value tables' gradient norm / the rest's. Command: "
                        f"`python benchmarks/ladder.py --seeds {args.seeds}"
                        f"{' --only ' + args.only if args.only else ''}`."],
                       ["group", "rung", "val loss", "vs dense-wide", "out/stream, first window",
                        "out/stream, last window", "rows used", "|g| values / rest"],
                       rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
