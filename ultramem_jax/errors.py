"""The one exception type for bad user input, and the one-line warning: train.py and the CLIs print a
UsageError as one ``error:`` line and exit 2."""
from __future__ import annotations

import errno
import re
import sys


class UsageError(Exception):
    """A config, data file, tokenizer, checkpoint or directory the user gave is unusable."""


def warn(message: str) -> None:
    """One ``warning:`` line on stderr (not warnings.warn: that adds a file:line header and the source line)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or in the text TensorStore puts in the errors it raises."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_path(err: BaseException) -> str | None:
    """The file a disk-full error names, if it names one."""
    while err is not None:
        if isinstance(err, OSError) and err.filename:
            return str(err.filename)
        m = re.search(r'(?:local file|Failed writing:) "(/[^"]+)"', str(err))
        if m:
            return m.group(1)
        err = err.__cause__ or err.__context__
    return None
