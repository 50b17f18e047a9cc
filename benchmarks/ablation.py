"""Benchmark d: the paper's Table 2 ablation, from PKM to UltraMem, one validation loss per cumulative change.

    python benchmarks/ablation.py           # quick: 9 runs x 200 steps x 16 x 128 tokens (~14 min on 2 CPU cores)
    python benchmarks/ablation.py --full    # 9 runs x 3000 steps x 32 x 256 tokens (0.63 epoch each; a GPU)

Every row keeps the model (tiny, GCIDE bytes), the data order and the value-parameter budget (10.6M) fixed and
adds one change to the row above.  Writes docs/results/ablation.md and docs/results/ablation.png.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

M = "model.memory."
# (row label, the paper's Table 2 val-loss delta for it, overrides added to the rows above)
STEPS = [
    ("PKM (one memory, softmax, D_v = d_model)", None,
     [M + "kind=pkm", M + "retrieval=product_key", M + "rank=1", M + "cores=1", M + "expansion=1",
      M + "shuffle=false", M + "share_query=false", M + "qk_norm=false", M + "score_activation=softmax",
      M + "output_proj=false", M + "value_init=pkm", M + "aux_loss=false", M + "value_dim=128", M + "num_keys=288",
      "model.memory_placement='1:1'", "optim.value_lr_multiplier=1.0"]),
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
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--out", default=os.path.join(common.ROOT, "runs", "bench-ablation"))
    args = p.parse_args(argv)
    steps, batch, seq = (3000, 32, 256) if args.full else (200, 16, 128)
    data = common.gcide()
    shared = ["model_name=tiny-x12", *common.train_overrides(data, steps, batch, seq, args.full, evals=1, logs=20)]
    overrides, rows, losses, prev = [], [], [], None
    for i, (label, paper_delta, change) in enumerate(STEPS):
        overrides = overrides + change
        run = common.train_run(f"row{i}", shared + overrides, args.out)
        loss = run["val_loss"]
        delta = "" if prev is None else f"{loss - prev:+.4f}"
        rows.append([label, f"{loss:.4f}", delta, "" if paper_delta is None else f"{paper_delta:+.3f}",
                     f"{run['seconds']:.0f}"])
        losses.append(loss)
        prev = loss
        print(f"{label}: {loss:.4f} {delta}", flush=True)
    rows.append(["total (last - first)", "", f"{losses[-1] - losses[0]:+.4f}", "-0.092", ""])
    common.write_table(os.path.join(common.RESULTS, "ablation.md"), "Benchmark d: ablation from PKM to UltraMem",
                       [f"tiny (d_model 128, 4 blocks), 10.6M value parameters in every row; GCIDE bytes, {steps} steps "
                        f"x {batch} x {seq} tokens, same batches; validation loss (nats/byte) on "
                        f"{'the whole' if args.full else '40 batches of the'} held-out split. Paper column: Table 2's "
                        f"C4 val-loss delta at 151M activated / 1.5B sparse (the split row sums its split, share-query "
                        f"and LN rows). Mode: {'full' if args.full else 'quick'}. Command: `python benchmarks/"
                        f"ablation.py{' --full' if args.full else ''}`."],
                       ["change (cumulative)", "val loss", "delta", "paper delta", "wall s"], rows)
    common.plot(os.path.join(common.RESULTS, "ablation.png"), "Ablation: validation loss per cumulative change",
                "row", "val loss (nats/byte)", {"ours": (list(range(len(losses))), losses)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
