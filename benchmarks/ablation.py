"""Benchmark d: the paper's Table 2 ablation, from PKM to UltraMem, one validation loss per cumulative change.

    python benchmarks/ablation.py           # quick: 9 rows x 3 seeds x 200 steps x 16 x 128 tokens (2 CPU cores)
    python benchmarks/ablation.py --full    # 9 rows x 3000 steps x 32 x 256 tokens (0.63 epoch each; a GPU)
    python benchmarks/ablation.py --seeds 0 # one seed
    python benchmarks/ablation.py --path v2 # UltraMemV2's changes, from tiny-x12 to tiny-v2 (quality.py's budget)

Every row keeps the model (tiny, GCIDE bytes), the data order and the value-parameter budget (10.6M) fixed and
adds one change to the row above.  Writes docs/results/ablation.md and docs/results/ablation.png (``--path v2``:
ablation-v2.md and .png).
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

M = "model.memory."
# (row label, the paper's Table 2 val-loss delta for it, overrides added to the rows above)
STEPS = [
    ("PKM (one memory, softmax, D_v = d_model)", None,
     [M + "kind=pkm", M + "retrieval=product_key", M + "rank=1", M + "cores=1", M + "expansion=1",
      M + "shuffle=false", M + "share_query=false", M + "qk_norm=false", M + "score_activation=softmax",
      M + "output_proj=false", M + "value_init=pkm", M + "aux_loss=false", M + "value_dim=128", M + "num_keys=288",
      M + "key_dim=32",
      "model.memory_placement='1:1'", "optim.value_lr_multiplier=1.0",
      # the paper's path: pin what our defaults changed (docs/results.md section 1)
      M + "out_proj_std=null", M + "balance_loss=0.0", "optim.value_learning_rate=0.0"]),
    ("+ remove softmax", -0.006, [M + "score_activation=identity"]),
    ("+ half D_v + output projection", -0.022, [M + "kind=ultramem", M + "value_dim=64", M + "output_proj=true",
                                                 M + "num_keys=407"]),
    ("+ split into 2 skip-layer memories (shared query, q/k norm)", -0.015 + 0.003 + 0.001,
     ["model.memory_placement=0:1/2:3", M + "num_keys=288", M + "share_query=true", M + "qk_norm=true"]),
    ("+ IVE (E = 4)", -0.017, [M + "expansion=4", M + "shuffle=true"]),
    ("+ TDQKR (r = 2)", -0.008, [M + "retrieval=tdqkr", M + "rank=2", M + "aux_loss=true"]),
    ("+ MCS (h = 2)", -0.003, [M + "cores=2"]),
    # The paper's init: values N(0, E/(2mHL)) and q/k-norm weights that put the selected scores' mean near 1.
    # At this size the value std equals the PKM rows' 1/sqrt(D_v) (both 0.125), so the norm init is what changes.
    ("+ improved init", -0.003, [M + "value_init=paper", M + "norm_init=paper"]),
    ("+ value-LR decay (4x -> 1x)", -0.022, ["optim.value_lr_multiplier=4.0"]),
    # not in the paper: our defaults on top of the paper's UltraMem (the ladder in docs/results.md found them)
    ("+ our recipe: softmax, zero-init projection, constant value LR 1e-3", None,
     [M + "score_activation=softmax", M + "out_proj_std=0.0", "optim.value_learning_rate=1e-3"]),
]

# UltraMemV2's changes (anchors-2026.md §1.1) from tiny-x12 to tiny-v2, both at 11.93M total and 1.25M activated.
# Rows are (label, the V2 paper's loss delta where it gives one, preset, overrides), not cumulative: the first and
# last rows are exactly quality.py's tiny-x12 and tiny-v2, so their runs are shared (same resolved config, same
# budget). The middle rows keep the table (204² rows of 64 floats per layer) and the activated size near both ends.
V2_INIT_UNDONE = ["model.init_std=0.02", M + "score_activation=softmax", M + "out_proj_std=0.0"]
V2_PATH = [
    ("UltraMem-x12 (V1, our recipe, a memory in every block)", None, "tiny-x12", []),
    ("+ one head, top-32, no IVE (one projector)", None, "tiny-x12",
     [M + "heads=1", M + "topk=32", M + "expansion=1"]),
    ("+ D_k 48 (the projectors' parameters moved to the keys)", None, "tiny-x12",
     [M + "heads=1", M + "topk=32", M + "expansion=1", M + "key_dim=48"]),
    # share_ratio 1/4 of 4 layer tables: each layer's window is exactly its own table (no sharing)
    ("+ PEER values D_p 16 : D_v 48, a query per Tucker rank (UltraMemV2, unshared tables)", -0.03, "tiny-v2",
     [*V2_INIT_UNDONE, M + "share_ratio=0.25"]),
    ("+ tables shared across layers (ring windows, ratio 0.5)", None, "tiny-v2", V2_INIT_UNDONE),
    ("+ V2's init and scores: linears sqrt(2/(5D)), identity scores, projection not zero-init", None, "tiny-v2", []),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench"))
    p.add_argument("--path", choices=["v1", "v2"], default="v1",
                   help="v1: the paper's Table 2, PKM to UltraMem; v2: UltraMemV2's changes, tiny-x12 to tiny-v2")
    args = p.parse_args(argv)
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        common.fail(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    data = common.gcide()
    if args.path == "v1":
        steps, batch, seq = (3000, 32, 256) if args.full else (200, 16, 128)
        shared = common.train_overrides(data, steps, batch, seq, args.full, evals=1, logs=20)
        path, cumulative = [], []
        for label, paper_delta, change in STEPS:
            cumulative = cumulative + change
            path.append((label, paper_delta, ["model_name=tiny-x12", *cumulative]))
    else:  # quality.py's budget and cadence, so that the end rows are its runs
        steps, batch, seq = (4000, 32, 256) if args.full else (400, 16, 128)
        shared = common.train_overrides(data, steps, batch, seq, args.full, evals=4, logs=40)
        path = [(label, delta, [f"model_name={preset}", *change]) for label, delta, preset, change in V2_PATH]
    losses = []  # losses[row][seed]
    for label, _, overrides in path:
        losses.append([common.train_run(None, [*overrides, *shared, f"seed={s}"], args.out, reuse=True)["val_loss"]
                       for s in seeds])
        print(f"{label}: " + " ".join(f"{x:.4f}" for x in losses[-1]), flush=True)
    rows = []
    for i, (label, paper_delta, _) in enumerate(path):
        mean = statistics.fmean(losses[i])
        if i == 0:
            delta = ""
        else:  # the change's effect, seed by seed (same batches and init within a seed)
            deltas = [a - b for a, b in zip(losses[i], losses[i - 1])]
            d, half = statistics.fmean(deltas), (max(deltas) - min(deltas)) / 2
            same_sign = all(x < 0 for x in deltas) or all(x > 0 for x in deltas)
            delta = f"{d:+.4f} ± {half:.4f}" + ("" if same_sign or len(deltas) == 1 else " (sign differs by seed)")
        rows.append([label, f"{mean:.4f}", delta, "" if paper_delta is None else f"{paper_delta:+.3f}"])
        if args.path == "v2":  # the middle rows' sizes drift: show them
            counts = param_counts(load_config(path[i][2]).model)
            rows[-1][1:1] = [f"{counts['total'] / 1e6:.2f}M", f"{counts['activated_per_token'] / 1e6:.3f}M"]
    total = [a - b for a, b in zip(losses[-1], losses[0])]
    command = f"python benchmarks/ablation.py{' --full' if args.full else ''} --seeds {args.seeds}"
    common_note = (f"GCIDE bytes, {steps} steps x {batch} x {seq} tokens, same batches per seed; validation loss "
                   f"(nats/byte) on {'the whole' if args.full else '40 batches of the'} held-out split, mean over "
                   f"seeds {args.seeds}; delta: the change's effect per seed against the row above, mean ± half its "
                   f"range. Mode: {'full' if args.full else 'quick'}.")
    if args.path == "v1":
        rows.append(["total (last - first)", "", f"{statistics.fmean(total):+.4f}", "-0.092"])
        name, title = "ablation", "Benchmark d: ablation from PKM to UltraMem"
        notes = [f"tiny (d_model 128, 4 blocks), 10.6M value parameters in every row; {common_note} Paper column: "
                 f"Table 2's C4 val-loss delta at 151M activated / 1.5B sparse (the split row sums its split, "
                 f"share-query and LN rows). Command: `{command}`."]
    else:
        rows.append(["total (tiny-v2 - tiny-x12)", "", "", "", f"{statistics.fmean(total):+.4f}", ""])
        name, title = "ablation-v2", "Benchmark d2: from UltraMem (V1) to UltraMemV2"
        notes = [f"tiny backbone (d_model 128, 4 blocks), a memory in every block, 11.9M total parameters in every "
                 f"row; {common_note} Paper column: the UltraMemV2 paper's loss delta where it gives one (PEER "
                 f"values: about -0.03 at 430M/5B, Fig. 2); it reports sharing in benchmark points only. "
                 f"Rows are not cumulative overrides but two presets with the changes between them undone "
                 f"(benchmarks/ablation.py V2_PATH). Command: `{command} --path v2`."]
    header = ["change (cumulative)", *(["total params", "activated / token"] if args.path == "v2" else []),
              "val loss", "delta", "paper delta"]
    common.write_table(os.path.join(common.RESULTS, f"{name}.md"), title, notes, header, rows)
    common.plot(os.path.join(common.RESULTS, f"{name}.png"), title.split(": ")[1] + ": validation loss per change",
                "row", "val loss (nats/byte)",
                {f"seed {s}": (list(range(len(losses))), [row[j] for row in losses]) for j, s in enumerate(seeds)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
