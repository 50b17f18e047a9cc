"""train.py, eval and prepare as a user runs them: subprocesses on a micro config and a small corpus."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.memory.num_keys=16",
         "model.memory.key_dim=8", "model.memory.value_dim=16", "model.memory.topk=4", "model.memory_placement=0:1",
         "batch_size=4", "seq_len=32", "eval_batches=4", "log_every=1", "data.num_threads=1", "eval_every=0",
         "peak_tflops=1"]  # MFU against a stated peak: no timed matmul per process (the smoke run still times it)
# one CPU device per process (no fake devices), compiled as quickly as conftest.py does
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE, "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


def shared_across_workers(tmp_path_factory, name, make):
    """``make(path)`` run once per test session, also under xdist: the first worker that asks makes ``name`` in
    the session's shared temporary directory (under a lock), the others wait for it and reuse it. Only for what
    tests read and never change."""
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common parent
    path, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a failed earlier attempt
            make(path)
            done.touch()
    return str(path)


def _write_corpus(path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "lorem", "ipsum", "memory", "value", "key", "query"]
    path.mkdir()
    with open(path / "text.txt", "w") as f:
        for _ in range(400):
            f.write(" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) + ".\n\n")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """One corpus per session: a run's fingerprint holds its path, so runs shared between workers need one."""
    return os.path.join(shared_across_workers(tmp_path_factory, "corpus", _write_corpus), "text.txt")


def train_cmd(out, corpus, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"output_dir={out}", f"data.dataset={corpus}",
            *MICRO, *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600, **kw)


def losses(out):
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}, [r for r in recs if r["kind"] == "eval"]


def ckpt_steps(out):
    d = os.path.join(out, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def start_until_step(cmd, out, step, timeout=300):
    """Starts a training process and returns it once its metrics show ``step`` done."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(out, "metrics.jsonl")) and max(losses(out)[0] or [0]) >= step:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"training never reached step {step}")


def snapshot(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getmtime(os.path.join(r, f)),
                   os.path.getsize(os.path.join(r, f))) for r, _, fs in os.walk(path) for f in fs)


REFERENCE = ["steps=30", "checkpoint_every=10"]


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, corpus):
    """An uninterrupted 30-step run with checkpoints at 10, 20, 30 (20 and 30 kept), made once per session (also
    for test_faults.py): tests only read it or copy it."""
    def make(out):
        r = run(train_cmd(str(out), corpus, *REFERENCE))
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stderr == "", r.stderr  # a clean run prints nothing on stderr
    return shared_across_workers(tmp_path_factory, "reference_run", make)


def test_kill_9_then_resume_gives_bitwise_identical_losses(tmp_path, corpus, reference_run):
    out = str(tmp_path / "killed")
    proc = start_until_step(train_cmd(out, corpus, *REFERENCE), out, 23)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt_steps(out), "no checkpoint was written before the kill"
    r = run(train_cmd(out, corpus, *REFERENCE))
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = int(r.stdout.split("resumed from step ")[1].split()[0])
    assert resumed in (10, 20)
    want, want_eval = losses(reference_run)
    got, got_eval = losses(out)
    assert sorted(got) == list(range(1, 31))
    for step in range(resumed + 1, 31):
        assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"
    assert got_eval[-1]["val_loss"] == want_eval[-1]["val_loss"]


def test_eval_reproduces_final_validation_loss(reference_run):
    r = run([sys.executable, "-m", "ultramem_jax.eval", reference_run, "--prompt", "alpha", "--max-new-tokens", "8"])
    assert r.returncode == 0, r.stderr[-2000:]
    _, evals = losses(reference_run)
    assert f"val_loss {evals[-1]['val_loss']:.4f}" in r.stdout
    assert f"{evals[-1]['val_tokens']:,} tokens" in r.stdout


def test_generate_cli_streams_batches_and_rejects_bad_prompts(tmp_path, reference_run):
    gen = [sys.executable, "-m", "ultramem_jax.generate", reference_run, "--max-new-tokens", "8", "--temperature", "0"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("alpha beta\n\ngamma\nomega delta key\n")
    r = run(gen + ["--prompts-file", str(prompts), "--batch-size", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split(" (")[0] for line in r.stdout.splitlines() if line.startswith("===")] == \
        ["=== prompt 0", "=== prompt 1", "=== prompt 2"]
    assert "prefill 30 tokens at" in r.stderr and "decode " in r.stderr and "3 prompt(s), batch 2" in r.stderr
    batched = r.stdout.split("=== prompt 1")[0].split("\n", 1)[1].rstrip("\n")
    single = run(gen + ["--prompt", "alpha beta"])  # streamed; greedy, so the same text as in the batch
    assert single.returncode == 0, single.stderr[-2000:]
    assert single.stdout.rstrip("\n") == batched and batched.startswith("alpha beta")
    for bad, message in [("", "error: prompt 0 is empty"), ("x" * 40, "error: prompt 0 has 40 tokens")]:
        r = run(gen + ["--prompt", bad])
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-2000:]


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, corpus, reference_run):
    out = str(tmp_path / "corrupt")
    shutil.copytree(reference_run, out)
    for root, _, files in os.walk(os.path.join(out, "checkpoints", "30", "params")):
        for f in files:
            open(os.path.join(root, f), "w").close()  # truncate every file of the newest step
    r = run(train_cmd(out, corpus, *REFERENCE))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "checkpoint step 30 is unreadable" in r.stderr
    assert "resumed from step 20" in r.stdout
    assert os.path.isdir(os.path.join(out, "checkpoints", "30.corrupt"))  # set aside, not deleted
    want, _ = losses(reference_run)
    got, _ = losses(out)
    assert all(got[s] == want[s] for s in range(21, 31))


DIVERGING = ["steps=40", "optim.learning_rate=1e30", "optim.warmup_frac=0.0", "optim.grad_clip=0.0"]


def test_nan_loss_stops_without_saving_the_bad_state(tmp_path, corpus):
    out = str(tmp_path / "nan")
    r = run(train_cmd(out, corpus, *DIVERGING, "checkpoint_every=1", "async_checkpointing=false"))
    assert r.returncode == 3, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and ("at step" in line or "after step" in line), line
    bad_step = int(line.split("step ")[1].split(";")[0])
    assert max(ckpt_steps(out) or [0]) < bad_step


@pytest.mark.parametrize("args,message", [
    (["bogus_key=1"], "bogus_key: unknown key"),
    (["steps=abc"], "steps: must be an integer"),
    (["model_name=nope"], "model_name: unknown preset 'nope'"),
    (["model.memory.expansion=3"], "model.memory.expansion: must be a perfect square"),
    (["data.dataset=/nonexistent/file.txt"], "file not found: /nonexistent/file.txt"),
])
def test_bad_input_fails_with_one_line(tmp_path, corpus, args, message):
    out = str(tmp_path / "bad")
    r = run(train_cmd(out, corpus, "steps=5", *args))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


def test_help_prints_usage_and_trains_nothing(tmp_path):
    r = run([sys.executable, os.path.join(ROOT, "train.py"), "--help", f"output_dir={tmp_path / 'h'}"])
    assert r.returncode == 0 and "python train.py [CONFIG.yml] [key=value ...]" in r.stdout
    assert "configs/base.yml" in r.stdout and not (tmp_path / "h").exists()


def test_unusable_paths_fail_clearly_and_touch_nothing(tmp_path, corpus, reference_run):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = run(train_cmd(str(tmp_path / "a"), str(empty), "steps=5"))
    assert r.returncode == 2 and "no text" in r.stderr
    garbage = tmp_path / "tok.json"
    garbage.write_text("\x00garbage")
    r = run(train_cmd(str(tmp_path / "b"), corpus, "steps=5", f"data.tokenizer={garbage}"))
    assert r.returncode == 2 and "unreadable" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run(train_cmd(str(blocker / "sub"), corpus, "steps=5"))
    assert r.returncode == 2 and "not writable" in r.stderr
    # a checkpoint from another model config: refused, nothing modified
    out = str(tmp_path / "incompatible")
    shutil.copytree(reference_run, out)
    before = snapshot(os.path.join(out, "checkpoints"))
    r = run(train_cmd(out, corpus, "steps=40", "checkpoint_every=10", "model.d_model=64"))
    assert r.returncode == 2 and r.stderr.startswith("error: model.d_model differs from the checkpoint")
    assert snapshot(os.path.join(out, "checkpoints")) == before


def test_prepare_then_train_with_bpe_and_the_first_progress_line_comes_after_the_first_step(tmp_path, corpus):
    prep = str(tmp_path / "prep")
    r = run([sys.executable, "-m", "ultramem_jax.data", "prepare", "--input", corpus, "--output", prep,
             "--tokenizer", "bpe", "--bpe-vocab-size", "300"])
    assert r.returncode == 0, r.stderr[-2000:]
    # one run for both checks (a train.py process and a compile fewer): a newcomer sees a sign of life after one
    # step, not after log_every steps; metrics.jsonl is unchanged
    out = str(tmp_path / "run")
    r = run(train_cmd(out, prep, "steps=4", "model.vocab_size=304", "log_every=50", "eval_every=0",
                      "checkpoint_every=0"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if line.lstrip().startswith("step")]
    assert lines[0].startswith("step      1/4") and "first step done" in lines[0]
    assert sorted(losses(out)[0]) == [4]  # only the regular log step is a metrics record
    r = run(train_cmd(str(tmp_path / "run2"), prep, "steps=4", "model.vocab_size=256"))
    assert r.returncode == 2 and "smaller than the tokenizer" in r.stderr


def test_smoke_run_of_the_default_config(tmp_path):
    out = str(tmp_path / "smoke")
    # The default model and corpus, as `make train` runs them, for 2 steps (the README's smoke run is 60) and 4
    # validation batches, not the whole split: every check below holds after any number of either (the
    # whole-split pass is checked in test_faults.py's test_eval_needs_only_the_run_directory_...).
    r = run([sys.executable, os.path.join(ROOT, "train.py"), "steps=2", "eval_batches=4", f"output_dir={out}"])
    assert r.returncode == 0, r.stderr[-2000:]
    _, evals = losses(out)
    assert evals and np.isfinite(evals[-1]["val_loss"])
    assert ckpt_steps(out) == [2]
    assert os.listdir(os.path.join(out, "tensorboard"))
