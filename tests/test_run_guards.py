"""The guards around a run: YAML as written, the output_dir lock, torn metrics, device and size checks."""
import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from ultramem_jax import distributed, footprint
from ultramem_jax.errors import UsageError, disk_full_path, is_disk_full
from ultramem_jax.mesh import batch_sharding, logical_rules, make_mesh
from ultramem_jax.metrics import MetricsLogger
from ultramem_jax.runlock import RunLock
from ultramem_jax.train_config import load_config


@pytest.mark.parametrize("text,want", [("1:3", "1:3"), ("0:1/2:3", "0:1/2:3"), ("12:30", "12:30")])
def test_placement_reads_as_written_in_overrides_and_files(tmp_path, text, want):
    layers = ["model.num_layers=32"]
    assert load_config(layers + [f"model.memory_placement={text}"]).model.memory_placement == want
    path = tmp_path / "run.yml"
    path.write_text(f"model:\n  num_layers: 32\n  memory_placement: {text}\n")
    assert load_config([str(path)]).model.memory_placement == want


def test_numbers_still_read_as_numbers():
    cfg = load_config(["optim.learning_rate=3e-4", "steps=0x10", "optim.b2=.99", "seed=1_000"])
    assert (cfg.optim.learning_rate, cfg.steps, cfg.optim.b2, cfg.seed) == (3e-4, 16, 0.99, 1000)


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from ultramem_jax.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), os.getcwd()], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"in use by another training run \\(pid {holder.pid}\\)"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path)).acquire()  # the killed holder's lock is stale
    assert open(tmp_path / ".lock").read().strip() == str(os.getpid())
    lock.release()


def test_metrics_resume_drops_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "kind": "train", "loss": 1.0 / s} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 7, "kind": "tr')
    logger = MetricsLogger(str(tmp_path), resume_step=4)
    logger.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs[:4]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped 1 unreadable line" in err[0]


@pytest.mark.parametrize("value,message", [("abc", "is not an integer"), ("0", "out of range"),
                                           ("-3", "out of range")])
def test_cpu_device_count_is_checked(monkeypatch, value, message):
    monkeypatch.setenv("ULTRAMEM_CPU_DEVICES", value)
    with pytest.raises(UsageError, match=message):
        distributed.configure_cpu_devices()


def test_size_bound_refuses_only_what_cannot_fit():
    mesh = make_mesh({"data": -1})
    sharding = batch_sharding(mesh, logical_rules([], mesh))
    footprint.check_fits(load_config(["seq_len=2048", "batch_size=8"]), sharding)  # fits: passes
    with pytest.raises(UsageError, match="seq_len=1000000, batch_size=16 .*attention weights of one layer"):
        footprint.check_fits(load_config(["seq_len=1000000"]), sharding)
    avail, _ = footprint.available_bytes(jax.devices())
    cfg = load_config(["seq_len=4096"])
    bound = footprint.lower_bound_bytes(cfg, cfg.batch_size // 8, 8, "cpu")
    # the attention term alone, recomputed by hand: per-device batch x heads x S^2 float32
    assert bound["attention weights of one layer"] == 4 * (cfg.batch_size // 8) * cfg.model.num_heads * 4096 ** 2
    assert avail > 0


def test_disk_full_is_recognised_through_the_chain():
    inner = OSError(28, "No space left on device", "/data/run/metrics.jsonl")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as outer:
        assert is_disk_full(outer) and disk_full_path(outer) == "/data/run/metrics.jsonl"
    ts = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/r/ckpt/2/_sharding": Failed to write 14248 '
                    "bytes to file 9: No space left on device [os_error_code='28']")
    assert is_disk_full(ts) and disk_full_path(ts) == "/r/ckpt/2/_sharding"
    assert not is_disk_full(ValueError("DATA_LOSS: bad checksum"))


def test_a_second_ctrl_c_quits_at_once():
    code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); from ultramem_jax.shutdown import "
            "StopRequest; stop = StopRequest().install(); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); "
            "print('first: stop requested' if stop else 'first: ignored', flush=True); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(30); print('still running')")
    r = subprocess.run([sys.executable, "-c", code, os.getcwd()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 128 + signal.SIGINT
    assert r.stdout.strip() == "first: stop requested"
    assert r.stderr.strip().splitlines() == [
        "interrupted: saving a checkpoint after this step (Ctrl-C again to quit at once)",
        "interrupted again: exiting now, without saving"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the test
def test_metrics_go_on_when_tensorboards_writer_thread_died(tmp_path):
    """tensorboardX's writer thread dies on an OSError (a full disk); its bounded queue then blocked every later
    write once full. The logger must notice, keep writing metrics.jsonl, and close without blocking."""
    import threading

    logger = MetricsLogger(str(tmp_path))
    logger.write(0, {"loss": 1.0})
    events = logger._tb.file_writer.event_writer

    def fail(*_):
        raise OSError(28, "No space left on device")
    events._ev_writer.write_event = fail  # the thread's next write raises, and the thread ends
    logger.write(1, {"loss": 0.9})
    events._worker.join(timeout=30)
    assert not events._worker.is_alive()
    done = threading.Event()

    def many_writes():
        for step in range(2, 200):  # far more events than the writer's queue holds (10)
            logger.write(step, {"loss": 0.5, "lr": 1e-3})
        logger.close()
        done.set()
    threading.Thread(target=many_writes, daemon=True).start()
    assert done.wait(60), "metrics writes blocked behind a dead TensorBoard writer"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == list(range(200))
