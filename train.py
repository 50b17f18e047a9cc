"""Train a language model with UltraMem memory layers (or a dense / PKM baseline).

    python train.py [CONFIG.yml] [key=value ...]        e.g.  python train.py steps=60 output_dir=/tmp/run

The flow: config → mesh → data → model and optimizer under the mesh → restore or init → jitted steps
(dispatching step N+1 before reading step N's metrics) → periodic eval → async Orbax checkpoints.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time

import jax

from ultramem_jax import data, distributed, training
from ultramem_jax.checkpointing import Checkpointer, abstract_like
from ultramem_jax.errors import UsageError, disk_full_path, is_disk_full
from ultramem_jax.footprint import check_fits
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh, memory_layout
from ultramem_jax.metrics import MetricsLogger
from ultramem_jax.optim import lr_schedule
from ultramem_jax.params import param_counts
from ultramem_jax.platforms import skip_absent_tpu
from ultramem_jax.quiet import quiet_library_noise
from ultramem_jax.runlock import RunLock
from ultramem_jax.shutdown import StopRequest
from ultramem_jax.stats import health_line, usage_stats
from ultramem_jax.train_config import config_fingerprint, load_config, resume_overrides


class Diverged(Exception):
    pass


def ensure_writable(path: str):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")  # per process: hosts of one run share the dir
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"output_dir {path} is not writable ({e.strerror})") from None


def newest(step: int) -> str:
    return f"the newest checkpoint is step {step}" if step else "no checkpoint has been saved"


def main(argv: list[str]) -> int:
    skip_absent_tpu()
    quiet_library_noise()
    distributed.configure_cpu_devices()  # ULTRAMEM_CPU_DEVICES=8: try sharding layouts on one CPU
    cfg = load_config(argv)
    distributed.initialize(cfg.distributed)
    is_main = jax.process_index() == 0
    ensure_writable(cfg.output_dir)
    run_lock = RunLock(cfg.output_dir).acquire() if is_main else None  # noqa: F841 (held until the process ends)
    mesh = make_mesh(cfg.mesh)
    rules = logical_rules(cfg.logical_axis_rules, mesh)
    layout, rules = memory_layout(cfg.memory_layout, mesh, rules, cfg.model, cfg.batch_size)
    data_sharding = batch_sharding(mesh, rules)
    check_fits(cfg, data_sharding)

    corpus = data.load_corpus(cfg.data, cfg.output_dir)
    if cfg.model.vocab_size < corpus.tokenizer.vocab_size:
        raise UsageError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{corpus.tokenizer.vocab_size}")
    baseline = data.unigram_cross_entropy(corpus.train, corpus.val, corpus.tokenizer.vocab_size)
    ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"), cfg.keep_checkpoints, cfg.async_checkpointing)
    fingerprint = config_fingerprint(cfg)
    ckpt.check_compatible(fingerprint, resume_overrides(cfg))
    if is_main:
        data.save_for_eval(corpus, cfg.output_dir)  # eval and sampling then need only the run directory

    model_def, model_state, opt_def, opt_state = training.build(cfg, mesh, rules, layout)
    train_iter = iter(data.train_dataset(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, jax.process_index(),
                                         jax.process_count(), cfg.data.num_threads, cfg.data.prefetch))
    start = 0
    restored = ckpt.restore_latest(abstract_like(model_state), abstract_like(opt_state), train_iter)
    if restored:
        start, model_state, opt_state, _ = restored
    usage = training.new_usage(cfg, mesh)
    train_step = training.make_train_step(model_def, opt_def, model_state, opt_state, usage, data_sharding)
    eval_step = training.make_eval_step(model_def, mesh)
    flush = training.make_flush(model_def, opt_def, model_state, opt_state)  # sparse value updates' catch-up
    global_shape = (cfg.batch_size, cfg.seq_len + 1)
    to_train = lambda x: jax.make_array_from_process_local_data(data_sharding, x, global_shape)  # noqa: E731

    logger = MetricsLogger(cfg.output_dir, start, enabled=is_main)
    flops_per_token = training.train_flops_per_token(cfg.model, cfg.seq_len)
    peak, peak_source = training.peak_flops_per_device(cfg.peak_tflops)
    counts = param_counts(cfg.model)
    if is_main:
        print(f"{cfg.model_name}: {counts['total'] / 1e6:.2f}M parameters "
              f"({counts['activated_per_token'] / 1e6:.2f}M activated per token) | mesh {dict(mesh.shape)} | memory layout "
              f"{layout.kind if layout else 'none'} | "
              f"{len(corpus.train):,} train / {len(corpus.val):,} val tokens | unigram baseline "
              f"{baseline:.4f} nats/token | {'resumed from step ' + str(start) if start else 'fresh start'}")
    stop = StopRequest().install()  # SIGTERM and Ctrl-C: save a checkpoint after the current step, then exit

    window = {"t": time.perf_counter(), "steps": 0}
    last_saved = start

    def logs_at(step):
        return step % cfg.log_every == 0 or step == cfg.steps

    def finish(step, metrics):
        """Reads step ``step``'s metrics (blocking on it alone), stops on a non-finite loss, logs."""
        nonlocal usage
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at step {step}; stopped without saving this state "
                           f"({newest(last_saved)})")
        window["steps"] += 1
        if not logs_at(step):
            return
        now = time.perf_counter()
        step_time = (now - window["t"]) / window["steps"]
        window.update(t=now, steps=0)  # the logging below counts toward the next window
        tok_s = cfg.batch_size * cfg.seq_len / step_time
        record = training.to_float_dict(metrics)
        record.update(lr=float(lr_schedule(cfg.optim, cfg.steps)(step - 1)), tokens_per_s=tok_s,
                      mfu=tok_s * flops_per_token / (peak * jax.device_count()), step_time_s=step_time)
        for i, counts in enumerate(jax.device_get(usage)):
            record[f"mem{i}/usage"], record[f"mem{i}/usage_entropy"] = usage_stats(counts)
        usage = training.new_usage(cfg, mesh)
        logger.write(step, record)
        if is_main:
            print(f"step {step:>6}/{cfg.steps} | loss {loss:.4f} | {tok_s / 1e3:.1f}k tok/s | "
                  f"MFU {record['mfu']:.1%} ({peak_source}) | ETA "
                  f"{training.format_duration(step_time * (cfg.steps - step))}"
                  f"{health_line(record, len(usage))}", flush=True)

    def run_eval(step):
        loss, count = training.validation_loss(eval_step, model_state, corpus.val, cfg, data_sharding)
        logger.write(step, {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_tokens": count}, "eval")
        if is_main:
            print(f"eval   {step:>6} | val_loss {loss:.4f} | ppl {math.exp(min(loss, 50)):.2f} | "
                  f"{count:,} tokens | unigram baseline {baseline:.4f}", flush=True)
        return loss

    pending = None
    for step in range(start, cfg.steps):
        batch = to_train(next(train_iter))
        model_state, opt_state, usage, metrics = train_step(model_state, opt_state, usage, batch)
        if pending:
            finish(*pending)
        pending, done = (step + 1, metrics), step + 1
        if step == start and is_main and not logs_at(done):  # a first sign of life within seconds, not 50 steps
            print(f"step {done:>6}/{cfg.steps} | loss {float(metrics['loss']):.4f} | first step done "
                  f"{time.perf_counter() - window['t']:.1f} s after start (compilation included); progress "
                  f"every {cfg.log_every} steps", flush=True)
        save_now = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps or stop
        eval_now = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        if save_now or eval_now or logs_at(done):
            # finished before the next step is dispatched: a saved state's loss must be known finite, and a
            # logged window (its time and slot usage) must not take in part of the next step
            finish(*pending)
            pending = None
        paused = time.perf_counter()
        if eval_now or save_now:  # sparse value updates: every table row catches up (dense AdamW's table)
            model_state, opt_state = flush(model_state, opt_state)
        if eval_now:
            run_eval(done)
        if save_now and not bool(training.all_finite(model_state)):
            raise Diverged(f"parameters are not finite after step {done}; stopped without saving this state "
                           f"({newest(last_saved)})")
        if save_now:
            meta = {"step": done, "fingerprint": fingerprint, "config": cfg.to_dict(),
                    "tokenizer_vocab": corpus.tokenizer.vocab_size}
            ckpt.save(done, model_state, opt_state, train_iter, meta)
            last_saved = done
        window["t"] += time.perf_counter() - paused  # evaluation and saving are not training throughput
        if stop:
            ckpt.wait()
            print(f"received signal {stop.signum}: saved checkpoint at step {done}, exiting", flush=True)
            return 128 + stop.signum
    ckpt.wait()
    logger.close()
    return 0


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.split("\n\n")[1].strip("\n") + "\n\nEvery key, with its default and meaning: configs/base.yml; "
              "model presets: configs/models/; sharding layouts: configs/sharding/.")
        sys.exit(0)
    try:
        sys.exit(main(sys.argv[1:]))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:  # before the training loop: nothing to save yet
        print("error: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:
        if not is_disk_full(e):
            raise
        where = f" writing {disk_full_path(e)}" if disk_full_path(e) else ""
        print(f"error: disk full{where} (no space left on device); free space and rerun the same command: "
              "training resumes from the newest complete checkpoint", file=sys.stderr)
        os._exit(4)  # at once: an async checkpoint write stuck on the full disk must not hold the exit
