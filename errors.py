"""Errors a user can cause (config, data, checkpoint, a full or read-only disk, Ctrl-C, SIGTERM) and faults of the
machine (memory, shared memory, a lost torchrun rank) end in one sentence, not a traceback: `UserError`, the words for
what the operating system refused, and `run_main`, which every script's command line runs its main() in. This module
imports no other module of the project, so every module can import it.
"""

import errno
import multiprocessing
import signal
import sys
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(Exception):
    """An error caused by input (config, data, checkpoint) whose message says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler or container stopping the job) under run_main: raised where the process is, as
    Ctrl-C's KeyboardInterrupt is, so the same unwinding runs (loader workers stop, nothing is left half-written)."""


_held_sigterm = {"depth": 0, "pending": False}  # sigterm_held's blocks open, and a SIGTERM that came in one


class sigterm_held:
    """A block in which a SIGTERM (under run_main) waits for the block's end: loader workers being started (a
    worker asked of the forkserver but not yet recorded cannot be ended, and fails with a traceback once its parent
    has exited)."""

    def __enter__(self):
        _held_sigterm["depth"] += 1

    def __exit__(self, kind, error, trace):
        _held_sigterm["depth"] -= 1
        if not _held_sigterm["depth"] and _held_sigterm["pending"]:
            _held_sigterm["pending"] = False
            raise Terminated()
        return False


def _raise_terminated(signum, frame):
    if _held_sigterm["depth"]:
        _held_sigterm["pending"] = True
        return
    raise Terminated()


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


# Faults of the machine that torch reports as a RuntimeError (or Python as a MemoryError), by words of its message.
RANK_LOSS_WORDS = ("connection closed by peer", "connection reset by peer", "timed out waiting", "broken pipe")


def machine_fault(error: BaseException) -> str:
    """One sentence for a fault of the machine rather than of the code: loader workers out of shared memory, out of
    memory, a torchrun rank lost; '' for any other error."""
    text = str(error)
    lowered = text.lower()
    cause = next((line.strip() for line in reversed(text.strip().splitlines()) if line.strip()), type(error).__name__)
    cause = cause[:200]
    if "shared memory" in lowered or ("/torch_" in text and "no space left" in lowered):
        return (f"the data loader workers ran out of shared memory ({cause}); rerun with --num_workers 0, or give the "
                f"machine a larger /dev/shm (docker run --shm-size 8g)")
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in lowered:
        where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host"
        return (f"out of {where} memory ({cause}); lower batch_size or val_batch_size, or the "
                f"model's size (num_slots, the widths)")
    if any(words in lowered for words in RANK_LOSS_WORDS) and (
            dist.is_initialized() or "gloo" in lowered or "nccl" in lowered):
        return (f"another rank of this torchrun job stopped or stalled, so this rank cannot go on ({cause}); the "
                f"first error is in the output of the rank that stopped")
    return ""


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


def end_worker_processes(timeout: float = 5.0) -> None:
    """End the processes this one started with multiprocessing (DataLoader workers) before it exits on an error or
    a stop: a worker still starting when its parent exits finds the parent's queues gone and prints a traceback
    under the parent's one-sentence message."""
    children = multiprocessing.active_children()
    if not children:
        return
    # torch's SIGCHLD handler would report each worker ended here as a failure (RuntimeError) mid-loop
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if threading.current_thread() is \
        threading.main_thread() else None
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout)
    if previous is not None:
        signal.signal(signal.SIGCHLD, previous)


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError (also one raised in a DataLoader worker), a refusal of the disk (full,
    read-only), Ctrl-C and SIGTERM each print one line, saying where a run can continue, and exit with status 2
    (130 for Ctrl-C, 143 for SIGTERM)."""
    status, stopping = 2, False
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handles_sigterm else None
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
    except (RuntimeError, MemoryError) as error:
        message = machine_fault(error)
        if not message:
            raise
        message += held_run_note()
    except KeyboardInterrupt as error:  # its words, if any, say what else stopped (study.py: its stages)
        status, stopping, said = 143 if isinstance(error, Terminated) else 130, True, str(error)
        nothing_lost = "" if said else "; every file is written atomically, so nothing half-written was left"
        message = ("stopped by SIGTERM" if status == 143 else "stopped by Ctrl-C") + (f"; {said}" if said else "") + (
            held_run_note() or nothing_lost)
    finally:
        if handles_sigterm:  # while a stop ends, another SIGTERM (study.py stopping its stages after Ctrl-C) is no news
            signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping else previous or signal.SIG_DFL)
    if stopping:
        end_worker_processes()
    for bar in list(getattr(tqdm, "_instances", [])):  # end a progress bar's line, so the sentence has its own
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():  # a torchrun rank leaves its process group cleanly before exiting
        dist.destroy_process_group()
    if stopping and handles_sigterm:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
    sys.exit(status)
