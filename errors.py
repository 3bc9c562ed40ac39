"""Errors a user can cause (config, data, checkpoint, a full or read-only disk, Ctrl-C) end in one sentence, not a
traceback: `UserError`, the words for what the operating system refused, and `run_main`, which every script's command
line runs its main() in. This module imports no other module of the project, so every module can import it.
"""

import errno
import sys
from typing import Any, Callable

import torch.distributed as dist
from tqdm import tqdm


class UserError(Exception):
    """An error caused by input (config, data, checkpoint) whose message says what to do."""


# What the operating system can refuse a run for, whatever the code: each ends in one sentence, not a traceback.
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def os_error_cause(error: OSError) -> str:
    """The cause of an OSError in a few words: "no space left on the device", "permission denied", ..."""
    return DISK_ERRNOS.get(error.errno) or (error.strerror or str(error) or type(error).__name__).lower()


def _worker_error(error: Exception):
    """The sentence of a UserError raised in a DataLoader worker, which torch re-raises in the main process as
    "Caught UserError in DataLoader worker process 0. Original Traceback ..." (the traceback's last line holds it);
    None for any other error."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught UserError in "):  # a worker, or the pin-memory thread
        return lines[-1].split("UserError: ", 1)[-1]
    return None


# Where a stopped run can continue from is known to runs.py, which claims the run directories and imports this module,
# so it hands the note in (set_held_run_note) rather than this module importing it; until then no run is held.
_held_run_source = None


def set_held_run_note(note: Callable[[], str]) -> None:
    """Make `note()` the answer of held_run_note (runs.py's, on import)."""
    global _held_run_source
    _held_run_source = note


def held_run_note() -> str:
    """For a message about a stop the run did not choose (Ctrl-C, a full disk): where the run this process holds
    can continue from; empty when it holds none."""
    return _held_run_source() if _held_run_source is not None else ""


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError (also one raised in a DataLoader worker), a refusal of the disk (full,
    read-only) and Ctrl-C each print one line, saying where a run can continue, and exit with status 2 (130 for
    Ctrl-C)."""
    status = 2
    try:
        main()
        return
    except UserError as error:
        message = _worker_error(error) or str(error)
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        where = f" {error.filename}" if error.filename else ""
        message = f"the operating system refused a file operation{where} ({os_error_cause(error)})" + held_run_note()
    except KeyboardInterrupt:
        status = 130
        message = "stopped by Ctrl-C" + (held_run_note() or "; every file is written atomically, so nothing "
                                                            "half-written was left")
    for bar in list(getattr(tqdm, "_instances", [])):  # end a progress bar's line, so the sentence has its own
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():  # a torchrun rank leaves its process group cleanly before exiting
        dist.destroy_process_group()
    sys.exit(status)
