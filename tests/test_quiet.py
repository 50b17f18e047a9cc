import sys
import threading
import types

from ultramem_jax import quiet


def _coroutine_from(filename):
    namespace = {}
    exec(compile("async def read():\n    raise ValueError('damaged')\n", filename, "exec"), namespace)
    return namespace["read"]()


def test_abandoned_orbax_reads_are_dropped_and_everything_else_still_reports(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(args.object))
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # install afresh; all three restored after
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    quiet.quiet_library_noise()
    orbax_read, own = _coroutine_from("/site-packages/orbax/checkpoint/x.py"), _coroutine_from("/work/mine.py")
    for obj in (orbax_read, own):
        sys.unraisablehook(types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("damaged"),
                                                 exc_traceback=None, err_msg=None, object=obj))
        obj.close()
    assert seen == [own]


def test_gloo_connection_lines_are_dropped_from_stdout_and_nothing_else_is_lost(rng):
    """Written to file descriptor 1 directly (as Gloo's C++ does), interleaved with the program's own lines; the
    last line has no newline and is printed just before exit."""
    import subprocess
    ours = [f"step {i} | loss {rng.random():.4f}" for i in range(int(rng.integers(3, 8)))]
    program = f"""
import os, sys
from ultramem_jax import quiet
print("before")
quiet.drop_stdout_lines()
for line in {ours!r}:
    os.write(1, b"[Gloo] Rank 0 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7\\n")
    os.write(1, b"[Gloo] Rank 1 is connected to [Gloo] Rank 2 peer ranks. Expected number of connected peer ranks is : 3\\n")
    os.write(1, b"3 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3\\n")
    print(line)
sys.stdout.write("last words")
"""
    r = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n".join(["before", *ours, "last words"])
