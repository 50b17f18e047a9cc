"""A real multi-process run: 2 processes x 4 CPU devices joined by jax.distributed on localhost, a value table
split over the mesh (hybrid layout: rows over fsdp, columns over tensor), killed and resumed; its losses match
one process with 8 devices, and its checkpoint restores onto a single process."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_cli import ENV, ROOT, ckpt_steps, corpus, losses, run, train_cmd  # noqa: F401

pytestmark = pytest.mark.slow
LAYOUT = ["sharding=hybrid.yml", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "steps=8", "checkpoint_every=4",
          "eval_every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out, corpus, port):  # noqa: F811
    """One process per JAX_PROCESS_ID, as on two hosts; returns the Popen objects."""
    procs = []
    for pid in range(2):
        env = {**ENV, "ULTRAMEM_CPU_DEVICES": "4", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(train_cmd(out, corpus, *LAYOUT), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def test_two_processes_killed_and_resumed_match_one_process(tmp_path, corpus):  # noqa: F811
    single = str(tmp_path / "single")
    r = subprocess.run(train_cmd(single, corpus, *LAYOUT), env={**ENV, "ULTRAMEM_CPU_DEVICES": "8"}, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in r.stdout

    multi = str(tmp_path / "multi")
    procs = launch(multi, corpus, free_port())
    deadline = time.time() + 900  # compiling for 8 devices takes minutes on a busy 2-core machine
    while time.time() < deadline and all(p.poll() is None for p in procs):
        done = os.path.exists(os.path.join(multi, "metrics.jsonl")) and max(losses(multi)[0] or [0]) >= 5
        if done and 4 in ckpt_steps(multi):
            break
        time.sleep(0.05)
    for p in procs:
        assert p.poll() is None, p.communicate()[1][-3000:]
        p.send_signal(signal.SIGKILL)  # the whole job dies mid-run, as on a preemption without notice
        p.wait()
    assert 4 in ckpt_steps(multi)

    procs = launch(multi, corpus, free_port())
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    assert "resumed from step" in outs[0][0] and "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in outs[0][0]
    assert not any("[Gloo]" in stdout for stdout, _ in outs)  # gloo's connection lines are filtered out
    want, want_eval = losses(single)
    got, got_eval = losses(multi)
    assert sorted(got) == list(range(1, 9))
    # the same batches and updates; the processes' batch rows come in another order (each reads every second
    # window), so sums differ in the last bits only
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=2e-5)
    np.testing.assert_allclose(got_eval[-1]["val_loss"], want_eval[-1]["val_loss"], rtol=2e-5)

    ev = run([sys.executable, "-m", "ultramem_jax.eval", multi])  # one process, one device
    assert ev.returncode == 0, ev.stderr[-2000:]
    printed = float(ev.stdout.split("val_loss ")[1].split()[0])
    assert abs(printed - got_eval[-1]["val_loss"]) < 2e-4 and "1 cpu device(s)" in ev.stdout
