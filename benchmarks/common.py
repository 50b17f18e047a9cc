"""Shared by the benchmark scripts: the GCIDE corpus, training runs through train.py, tables and plots."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
GCIDE_SOURCE = "/usr/share/dictd/gcide.dict.dz"
GCIDE_PREPARED = os.path.join(ROOT, "data", "gcide-byte")

sys.path.insert(0, ROOT)

from ultramem_jax.platforms import skip_absent_tpu  # noqa: E402

skip_absent_tpu()  # the benchmark scripts import this module before they compute anything


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def gcide() -> str:
    """The prepared GCIDE dictionary corpus (byte tokens), made once with the pipeline's own `prepare`."""
    if os.path.exists(os.path.join(GCIDE_PREPARED, "meta.json")):
        return GCIDE_PREPARED
    if not os.path.exists(GCIDE_SOURCE):
        fail(f"{GCIDE_SOURCE} not found: install it with `apt-get install dict-gcide` (see benchmarks/README.md)")
    cmd = [sys.executable, "-m", "ultramem_jax.data", "prepare", "--input", GCIDE_SOURCE, "--output",
           GCIDE_PREPARED, "--decode-errors", "replace"]
    if subprocess.run(cmd, cwd=ROOT).returncode:
        fail("preparing the GCIDE corpus failed")
    return GCIDE_PREPARED


def train_run(name: str | None, overrides: list[str], out_root: str, reuse: bool = False) -> dict:
    """Runs train.py with ``overrides``; returns its final validation loss, loss curve and wall time.

    With ``reuse``, a finished run in the same directory whose resolved config (every key, defaults included)
    equals this one's is read back instead of trained again, so benchmarks can share rows; a changed default
    changes the resolved config and forces a new run.
    """
    import hashlib

    resolved = _resolve(overrides)
    if name is None:  # named by what it trains: identical configs share one run
        digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{resolved['model_name']}-{digest}"
    out = os.path.join(out_root, name)
    done_file = os.path.join(out, "benchmark_run.json")
    if reuse:
        found = _find_run(out_root, resolved)
        if found:
            return found
    # A run cut short (a session that ended, a kill) whose partial record holds this exact config resumes from
    # its last checkpoint: train.py resumes bitwise-identically (tests/test_train_cli.py), so long runs can span
    # sessions. Anything else in the directory (a short run cut before any checkpoint too) is stale and goes.
    partial_file = os.path.join(out, "benchmark_partial.json")
    earlier_seconds = 0.0
    if os.path.exists(out):
        partial = _read_json(partial_file)
        checkpoints = os.path.join(out, "checkpoints")
        if partial.get("config") == resolved and os.path.isdir(checkpoints) and os.listdir(checkpoints):
            earlier_seconds = partial.get("seconds", 0.0)
            print(f"resuming the cut-short run {name} ({earlier_seconds:.0f} s so far)", file=sys.stderr)
        else:
            import shutil
            shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    _write_json(partial_file, {"config": resolved, "seconds": earlier_seconds})
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={out}", *overrides]
    t0 = time.time() - earlier_seconds
    # Benchmark runs compile the same few programs over and over: share XLA's compilation cache between them.
    env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(ROOT, "runs", ".xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1", **os.environ}
    with open(os.path.join(out, "benchmark_stderr.txt"), "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        while proc.poll() is None:  # the wall time so far survives a kill of this process too
            time.sleep(5)
            _write_json(partial_file, {"config": resolved, "seconds": time.time() - t0})
    seconds = time.time() - t0
    if proc.returncode:
        tail = open(os.path.join(out, "benchmark_stderr.txt")).read().strip().splitlines()[-1:]
        fail(f"run {name} failed (exit {proc.returncode}): {tail}")
    run = _read_run(name, out, seconds)
    with open(done_file, "w") as fh:
        json.dump({"overrides": list(overrides), "config": resolved, "seconds": seconds}, fh)
    os.remove(partial_file)
    return run


def _read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _write_json(path: str, record: dict):
    with open(path + ".tmp", "w") as fh:  # replaced whole, so a kill never leaves half a record
        json.dump(record, fh)
    os.replace(path + ".tmp", path)


def cached_run(overrides: list[str], out_root: str) -> dict | None:
    """The finished run under ``out_root`` that ``train_run(None, overrides, out_root, reuse=True)`` would read
    back, or None: tabulate without training."""
    return _find_run(out_root, _resolve(overrides))


def _resolve(overrides: list[str]) -> dict:
    from ultramem_jax.train_config import load_config
    resolved = load_config(list(overrides)).to_dict()
    resolved.pop("output_dir")
    return resolved


def _find_run(out_root: str, resolved: dict):
    """A finished run under ``out_root`` whose config equals ``resolved``. Keys added to the code after a run
    was made count at the preset's value (a new knob's default is the behaviour it replaced)."""
    import glob

    from ultramem_jax.train_config import load_config
    preset = load_config([f"model_name={resolved['model_name']}"]).to_dict()
    preset.pop("output_dir")
    want = _meaningful(json.loads(json.dumps(resolved)))
    for path in sorted(glob.glob(os.path.join(out_root, "*", "benchmark_run.json"))):
        with open(path) as fh:
            done = json.load(fh)
        stored = done.get("config")
        if stored and stored.get("model_name") == resolved["model_name"] and \
                _meaningful(_fill(stored, preset)) == want:
            return _read_run(os.path.basename(os.path.dirname(path)), os.path.dirname(path), done["seconds"])
    return None


def _meaningful(cfg: dict) -> dict:
    """A resolved config without the keys that cannot change its run: value-table optimizer knobs when the model
    has no memory layer."""
    # How often a run saved checkpoints cannot change its losses (resume is bitwise-identical).
    cfg = {k: v for k, v in cfg.items() if k not in ("checkpoint_every", "keep_checkpoints")}
    if cfg.get("model", {}).get("memory") is None:
        cfg = {**cfg, "optim": {k: v for k, v in cfg.get("optim", {}).items() if not k.startswith("value_")}}
    return cfg


def _fill(stored: dict, defaults: dict) -> dict:
    """``stored`` with the keys it lacks taken from ``defaults``, recursively."""
    out = dict(stored)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _fill(out[k], v)
    return json.loads(json.dumps(out))


def _read_run(name: str, out: str, seconds: float) -> dict:
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    train = [(r["step"], r["ce"]) for r in records if r.get("kind") == "train" and "ce" in r]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    if not evals:
        fail(f"run {name} wrote no validation loss")
    trains = [r for r in records if r.get("kind") == "train"] or [{}]
    return {"name": name, "val_loss": evals[-1][1], "train_curve": train, "val_curve": evals, "seconds": seconds,
            "first_train": trains[0], "last_train": trains[-1]}


def slug(text: str) -> str:
    """A file-name-safe form of a label or dataset name."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


def train_overrides(data: str, steps: int, batch: int, seq: int, full: bool, evals: int, logs: int) -> list[str]:
    """train.py overrides shared by the training benchmarks: ``evals`` validation passes (the whole split in
    full mode, 40 batches in quick mode), about ``logs`` log lines, and checkpoints only for long runs (every
    eighth of the way, so a run cut short resumes; the end state is not kept)."""
    return [f"data.dataset={data}", f"steps={steps}", f"batch_size={batch}", f"seq_len={seq}",
            f"eval_every={steps // evals}", "eval_batches=" + ("0" if full else "40"),
            f"checkpoint_every={steps // 8 if steps >= 1000 else 0}", f"log_every={max(10, steps // logs)}"]


def write_table(path: str, title: str, notes: list[str], header: list[str], rows: list[list]) -> str:
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    print(text)
    return text


def plot(path: str, title: str, xlabel: str, ylabel: str, series: dict, logx=False, logy=False):
    """series: label → (xs, ys)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ---- timing jitted model calls (benchmarks a and b) ---------------------------------------------------------
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_argument(parser):
    """``--clock wall|cpu``; ``CLOCKS[args.clock]`` is then the timer."""
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (all threads): steadier on a machine that other "
                             "jobs load, but it counts XLA's parallel threads twice")


def timed_ms(fn, *args, repeats: int = 10, best: bool = False) -> float:
    """Wall time in ms of ``repeats`` calls after one warm-up call (compilation): the median, or the best."""
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * (times[0] if best else times[len(times) // 2])


def device_line() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.device_kind} ({jax.default_backend()}, {jax.device_count()} device), jax {jax.__version__}"


@functools.lru_cache(maxsize=1)
def _doc_bytes() -> bytes:
    """This repo's own Markdown docs, read once per process (present on every checkout)."""
    import glob
    return b"\n\n".join(open(f, "rb").read() for f in sorted(glob.glob(os.path.join(ROOT, "**", "*.md"), recursive=True))
                        if "/.venv/" not in f and "/runs/" not in f)


def sample_tokens(rng, shape, vocab_size: int):
    """Byte-token windows of English text (the repo's docs), so that routers and key searches see text-like
    inputs rather than uniform noise."""
    import numpy as np
    ids = np.frombuffer(_doc_bytes(), np.uint8).astype(np.int32) % vocab_size
    n = int(np.prod(shape))
    reps = -(-n // len(ids)) + 1
    ids = np.tile(ids, reps)
    start = int(rng.integers(0, len(ids) - n))
    return ids[start:start + n].reshape(shape)
