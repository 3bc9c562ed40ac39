"""Files a reader can rely on: atomic writes (a reader never sees a half-written file, a full disk is one sentence),
JSON every parser reads, and the exclusive lock of a file that keeps a second process out of a directory."""

import fcntl
import json
import math
import os
import tempfile
from typing import Callable

import torch

from errors import DISK_ERRNOS, UserError, held_run_note, os_error_cause


# ----------------------------------------------------------------------------------------------------------------
# Atomic file writes: a reader never sees a half-written file.

def strict_json(value, **kwargs) -> str:
    """JSON that every parser reads: NaN and infinities (an undefined metric, e.g. ARIfg of an image without
    foreground) become null instead of Python's non-standard NaN / Infinity tokens."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def atomic_write(path: str, write: Callable, binary: bool = False) -> None:
    """Call `write(file)` on a temporary file beside `path`, flush it to disk, then rename it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode of a file open() would create (mkstemp's is 0600)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        cause = os_error_cause(error) if isinstance(error, OSError) and error.errno in DISK_ERRNOS else None
        if isinstance(error, RuntimeError) and "inline_container.cc" in str(error):  # torch.save's zip writer
            cause = "the write failed, most likely no space left on the device"
        if cause:
            raise UserError(f"could not write {path} ({cause}), and nothing half-written was left; free space or make "
                            f"the directory writable{held_run_note() or ', then rerun'}") from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to `path` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


# ----------------------------------------------------------------------------------------------------------------
# Exclusive locks: one process at a time in a directory (a run, a dataset being written).

def exclusive_lock(path: str, busy: str):
    """An open handle holding the exclusive flock of the file `path` (created if missing); UserError(busy) when
    another process holds it. OSErrors of opening the file propagate to the caller."""
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError(busy) from None
        try:  # the holder before us may have removed the file on release: then lock the new one
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()
