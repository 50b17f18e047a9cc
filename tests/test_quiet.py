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
