"""One run per output_dir: an exclusive lock file held for the life of the training process.

``fcntl.flock`` is released by the kernel when the process dies, however it dies, so a lock left by a killed
run is simply taken over.  Where the filesystem has no flock (some network mounts) the pid written in the file
decides: a lock whose process is gone is stale and taken over.
"""
from __future__ import annotations

import errno
import fcntl
import os

from ultramem_jax.errors import UsageError

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """``with RunLock(output_dir):`` or ``acquire()`` / ``release()``; refuses with a UsageError naming the pid
    of the run that holds it."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                self._refuse(_holder(self.path))
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            pid = _holder(self.path)  # no flock here: judge by the recorded pid
            if pid and pid != os.getpid() and _alive(pid):
                os.close(fd)
                self._refuse(pid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _refuse(self, pid):
        who = f" (pid {pid})" if pid else ""
        raise UsageError(f"{os.path.dirname(self.path)} is in use by another training run{who}; wait for it to "
                         "finish, stop it, or use another output_dir")

    def release(self):
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
