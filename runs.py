"""A run's directory and what it keeps there: the claim and exclusive lock of the directory (one run per directory,
an old run moved aside, never overwritten), the run's logs (log.txt, log.jsonl, TensorBoard), and its checkpoints
(written atomically, listed, resolved, loaded safely, frozen weights shared between them)."""

import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from devices import Dist
from errors import DISK_ERRNOS, UserError, held_run_note, os_error_cause, set_held_run_note
from files import atomic_torch_save, atomic_write_text, exclusive_lock, strict_json


# ----------------------------------------------------------------------------------------------------------------
# Run directories: one run per directory, held under an exclusive lock for the run's lifetime.

RUN_FILES = ("config.yaml", "log.txt", "log.jsonl", "best.pt", "figures", "tensorboard")  # besides ckpt_*.pt
_RUN_LOCKS = {}  # real out_dir -> open lock file of this process


def _run_files(out_dir: str) -> list:
    """The files of a run in `out_dir` (checkpoints and their shared frozen weights, logs, config, figures)."""
    frozen = sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir) if re.fullmatch(r"frozen-[0-9a-f]+\.pt", n)) \
        if os.path.isdir(out_dir) else []
    named = [os.path.join(out_dir, n) for n in RUN_FILES]
    evaluations = sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith("eval_")) \
        if os.path.isdir(out_dir) else []  # evaluate.py's default output beside the run it evaluated
    found = [p for p in list_checkpoints(out_dir) + frozen + named + evaluations if os.path.exists(p)]
    environment = os.path.join(out_dir, ENVIRONMENT_FILE)  # alone it is a start that failed early, not a run to keep
    return found + [environment] if found and os.path.exists(environment) else found


def lock_run_dir(out_dir: str) -> None:
    """Take the exclusive lock of `out_dir` (a `.lock` file, flock) for the rest of this process or until the same
    process claims the directory again; another process holding it is refused."""
    key = os.path.realpath(out_dir)
    if key in _RUN_LOCKS:  # the same process starts another run here (tests, study scripts): the old one ended
        _RUN_LOCKS.pop(key).close()
    path = os.path.join(out_dir, ".lock")
    _RUN_LOCKS[key] = exclusive_lock(path, f"another process is running in {out_dir} (it holds {path}); wait for it "
                                           f"to end or choose another --out_dir")


def _held_run_note() -> str:
    """errors.held_run_note's answer, for a message about a stop the run did not choose (Ctrl-C, a full disk): where
    the run this process holds can continue from; empty when it holds none."""
    if not _RUN_LOCKS:
        return ""
    out_dir = list(_RUN_LOCKS)[-1]  # the latest claimed
    found = list_checkpoints(out_dir)
    if not found:
        return f"; {out_dir} holds no checkpoint of this run yet, so rerun with --resume auto to start it again"
    return (f"; {out_dir} keeps every checkpoint up to {os.path.basename(found[-1])} (step "
            f"{_checkpoint_step(found[-1])}), continue from it with --resume auto")


set_held_run_note(_held_run_note)  # run_main and atomic_write end their sentences with it


def release_run_dir(out_dir: str) -> None:
    """Give up this process's lock of `out_dir` (a run that ended); the lock file goes while still held."""
    handle = _RUN_LOCKS.pop(os.path.realpath(out_dir), None)
    if handle is not None:
        try:
            os.remove(os.path.join(out_dir, ".lock"))
        except FileNotFoundError:
            pass
        handle.close()


def claim_run_dir(config: dict, d: "Dist") -> None:
    """Make `out_dir` this run's (rank 0): lock it, and refuse a fresh start into a directory that holds another
    run's checkpoints or logs unless `overwrite` (the old files move to `old-<time>/`, nothing is deleted) or
    `resume: auto` (which continues the run there, or starts afresh after moving a run without checkpoints aside)."""
    error = None
    if d.is_main:
        try:
            _claim(config)
        except UserError as caught:
            error = str(caught)
        except OSError as caught:  # a read-only or full disk, a path component that is a file
            where = f" ({caught.filename})" if caught.filename else ""
            error = (f"cannot use {config['out_dir']} as the run directory: {os_error_cause(caught)}{where}; make it "
                     f"writable or choose another --out_dir")
    if d.enabled:  # every rank stops with rank 0's sentence, and none reads out_dir before it is settled
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)


def _claim(config: dict) -> None:
    out_dir = config["out_dir"]
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} is a file, not a directory; choose another --out_dir")
    os.makedirs(out_dir, exist_ok=True)
    lock_run_dir(out_dir)
    resume = config["resume"]
    continuing = (resume == "auto" and list_checkpoints(out_dir)) or (
        resume not in ("", "auto") and os.path.realpath(os.path.dirname(os.path.abspath(resume)) if os.path.isfile(
            resume) else resume) == os.path.realpath(out_dir))
    for name in os.listdir(out_dir):  # left by a killed writer: under the lock, nothing else is writing here
        if name.startswith(".tmp-") and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    old = _run_files(out_dir)
    if continuing and resume != "auto" and os.path.isfile(resume):
        _branch(out_dir, resume, config.get("overwrite"))
    if continuing or not old:
        return
    if not (config.get("overwrite") or resume == "auto"):
        raise UserError(f"{out_dir} already holds a run ({', '.join(sorted(os.path.basename(p) for p in old)[:4])}"
                        f"{', ...' if len(old) > 4 else ''}); continue it with --resume auto, start afresh with "
                        f"--overwrite true (its files move to {out_dir}/old-<time>/), or choose another --out_dir")
    vae = os.path.realpath(config["vae_ckpt"]) if config.get("vae_ckpt") else None
    moved = [os.path.realpath(p) for p in old] + [os.path.realpath(out_dir)]
    if vae and any(vae == p or vae.startswith(p + os.sep) for p in moved[:-1]) or vae == moved[-1]:
        raise UserError(f"vae_ckpt {config['vae_ckpt']} lies in {out_dir}, whose run files move to "
                        f"{out_dir}/old-<time>/ before the VAE is read; copy the VAE out of {out_dir} and point "
                        f"vae_ckpt there, or choose another --out_dir")
    _move_aside(out_dir, old)


def _move_aside(out_dir: str, paths: list) -> str:
    """Move `paths` into a new, empty `old-<time>[-n]/` of out_dir, files that must not be overwritten; returns it."""
    aside = os.path.join(out_dir, "old-" + time.strftime("%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(aside + (f"-{suffix}" if suffix else "")):
        suffix += 1
    aside += f"-{suffix}" if suffix else ""
    os.makedirs(aside)
    for path in paths:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


def _checkpoint_step(path: str):
    """The step of a checkpoint file: from its name (ckpt_<step>.pt), else read from the file; None if unreadable."""
    step = step_in_name(os.path.basename(path))
    if step is not None:
        return step
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return None


def _branch(out_dir: str, resume: str, overwrite: bool) -> None:
    """Resuming from a checkpoint of out_dir older than its newest starts a second trajectory there: the newer
    checkpoints would be overwritten step by step, and those not reached again would stay behind as the latest of a
    directory mixing two runs. Refuse, or with `overwrite` move the abandoned branch aside (its later checkpoints,
    figures and best.pt, with copies of its logs, config and frozen weights, so it stays loadable and readable)."""
    step = _checkpoint_step(resume)
    newer = [p for p in list_checkpoints(out_dir) if step is not None and (_checkpoint_step(p) or 0) > step]
    if not newer:
        return
    names = ", ".join(os.path.basename(p) for p in newer[:3]) + (", ..." if len(newer) > 3 else "")
    if not overwrite:
        raise UserError(f"{resume} is step {step} but {out_dir} holds later checkpoints of the run ({names}), which a "
                        f"run resumed there would overwrite or leave mixed with its own; resume into another "
                        f"--out_dir, or pass --overwrite true to move the later files into {out_dir}/old-<time>/")
    aside = _move_aside(out_dir, newer)
    best = os.path.join(out_dir, "best.pt")
    if os.path.isfile(best) and (_checkpoint_step(best) or 0) > step:  # a resume recreates it from the branch point
        os.replace(best, os.path.join(aside, "best.pt"))
    figures = os.path.join(out_dir, "figures")
    for name in sorted(os.listdir(figures)) if os.path.isdir(figures) else []:
        digits = re.match(r"step_(\d+)", name)
        if digits and int(digits.group(1)) > step:
            os.makedirs(os.path.join(aside, "figures"), exist_ok=True)
            os.replace(os.path.join(figures, name), os.path.join(aside, "figures", name))
    for path in _run_files(out_dir):
        name = os.path.basename(path)
        if name.startswith("frozen-") or name in ("config.yaml", "log.txt", "log.jsonl"):
            shutil.copy2(path, os.path.join(aside, name))
        elif name == "tensorboard":
            shutil.copytree(path, os.path.join(aside, name))
    print(f"{os.path.basename(resume)} is step {step}: the later checkpoints of {out_dir} ({names}) moved to {aside}/",
          flush=True)


# ----------------------------------------------------------------------------------------------------------------
# What ran: the environment a run started in (environment.json), so a result can be traced to its software, hardware
# and code. Written once when the run first starts; a resume in another environment appends a record to "resumes".

ENVIRONMENT_FILE = "environment.json"
REPOSITORY = os.path.dirname(os.path.abspath(__file__))
GIT_TIMEOUT_SECONDS = 5
# What makes two environments different; the command line, the start time and the host of a resume may change freely
ENVIRONMENT_KEYS = ("python", "torch", "cuda", "cudnn", "device", "device_type", "torch_threads", "commit", "dirty")


def git_state(repository: str = REPOSITORY) -> tuple:
    """(commit, dirty) of the git checkout at `repository`: the HEAD commit and whether tracked files differ from it;
    (None, None) without a .git there, without git, or when git fails or is slow (the record never stops a run)."""
    if not os.path.exists(os.path.join(repository, ".git")):
        return None, None  # not a checkout (an unpacked copy): git would find an enclosing repository instead
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}  # GIT_DIR would redirect it
    try:
        commit, status = (subprocess.run(["git", "--no-optional-locks", *command], cwd=repository, env=env,
                                         capture_output=True, text=True, timeout=GIT_TIMEOUT_SECONDS)
                          for command in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode or status.returncode:
        return None, None
    return commit.stdout.strip() or None, bool(status.stdout.strip())


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: torch.device, repository: str = REPOSITORY) -> dict:
    """The software, hardware and code this process runs with, and how it was started."""
    commit, dirty = git_state(repository)
    return {"python": sys.version, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": device_name(device), "device_type": device.type, "torch_threads": torch.get_num_threads(),
            "commit": commit, "dirty": dirty, "command": list(sys.argv), "hostname": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def record_environment(out_dir: str, device: torch.device, resumed: bool, repository: str = REPOSITORY) -> dict:
    """Write out_dir/environment.json when a run starts afresh; on a resume keep it, appending this environment to
    its "resumes" list only when it differs from the latest one recorded. Returns what the file holds."""
    path = os.path.join(out_dir, ENVIRONMENT_FILE)
    current = environment(device, repository)
    record = read_environment(out_dir) if resumed else None
    if record is None:
        record = current
    else:
        latest = (record.get("resumes") or [record])[-1]
        if any(latest.get(key) != current[key] for key in ENVIRONMENT_KEYS):
            record["resumes"] = record.get("resumes", []) + [current]
        else:
            return record
    atomic_write_text(path, strict_json(record, indent=2) + "\n")
    return record


def read_environment(run_dir: str):
    """A run's environment.json as a dict, or None when it has none or it cannot be read."""
    try:
        with open(os.path.join(run_dir, ENVIRONMENT_FILE)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_environment(record) -> str:
    """One line for a report: "torch X, CUDA Y, device Z, commit abc1234 (dirty)" of the environment the run started
    in, with how many resumes ran in another one."""
    if not record:
        return "unknown (no environment.json in the checkpoint's directory)"
    commit = record.get("commit")
    code = f"commit {commit[:7]}{' (dirty)' if record.get('dirty') else ''}" if commit else "commit unknown (no git)"
    cuda = record.get("cuda") or "none"
    cuda += " (unused)" if record.get("cuda") and record.get("device_type") == "cpu" else ""  # a CUDA build on a CPU
    line = f"torch {record.get('torch')}, CUDA {cuda}, device {record.get('device')}, {code}"
    resumes = len(record.get("resumes") or [])
    return line + (f"; resumed {resumes} time(s) in another environment (environment.json)" if resumes else "")


# ----------------------------------------------------------------------------------------------------------------
# Logging: rank-0 text log (stdout + log.txt) and one JSON object per line in log.jsonl.

def tensorboard_writer(log_dir: str, purge_step: int = None):
    """A TensorBoard SummaryWriter on `log_dir` when the optional `tensorboard` package is installed, else None.
    `purge_step`: a resumed run drops the events it is about to write again (step >= purge_step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional (README, "The pipeline"): the runs work the same without it
        return None
    return SummaryWriter(log_dir, purge_step=purge_step, flush_secs=30)


def tensorboard_tag(key: str) -> str:
    """log.jsonl key -> TensorBoard tag: validation keys under val/, training ones under train/."""
    return "val/" + key[len("val_"):] if key.startswith("val_") else "train/" + key


class RunLog:
    """Rank 0's logs of a run: log.txt (and stdout), log.jsonl, and TensorBoard events under out_dir/tensorboard
    when tensorboard is installed. Every row's `step` counts the completed optimisation steps (the number the
    checkpoint and the figure of that step carry)."""

    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.out_dir = out_dir
        self._writer, self._purge_step = None, None
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def writer(self):
        """The run's TensorBoard writer, opened on first use; None without tensorboard or on other ranks."""
        if self.enabled and self._writer is None:
            self._writer = tensorboard_writer(os.path.join(self.out_dir, "tensorboard"), self._purge_step) or False
        return self._writer or None

    def image(self, tag: str, path: str, step: int) -> None:
        """A PNG figure the run wrote, mirrored into TensorBoard (nothing without tensorboard)."""
        writer = self.writer()
        if writer is not None:
            with Image.open(path) as picture:
                writer.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()
        self._writer = None

    def info(self, message: str, echo: bool = True) -> None:
        """A line in log.txt, and on stdout unless `echo` is False (the progress bar shows the training loss)."""
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if echo:
            tqdm.write(line)  # keeps an active progress bar intact
        self._append("log.txt", line + "\n")

    def record(self, entry: dict) -> None:
        if not self.enabled:
            return
        self._append("log.jsonl", strict_json(entry) + "\n")
        writer = self.writer()
        if writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tensorboard_tag(key), value, entry["step"])
            writer.flush()

    def _append(self, name: str, text: str) -> None:
        """Append to a log; a full or read-only disk ends the run in one sentence (a torn last line of log.jsonl is
        dropped on resume)."""
        path = os.path.join(self.out_dir, name)
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as error:
            if error.errno not in DISK_ERRNOS:
                raise
            raise UserError(f"could not write {path} ({os_error_cause(error)}); free space or make the directory "
                            f"writable{held_run_note() or ', then rerun'}") from None

    def rewind(self, step: int) -> None:
        """Drop the log.jsonl entries (and TensorBoard events) after `step` completed steps: a run resumed from the
        checkpoint of step `step` writes them again."""
        if self.enabled:
            truncate_log(os.path.join(self.out_dir, "log.jsonl"), step)
            self.close()
            self._purge_step = step + 1


def progress_bar(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """tqdm that redraws often on a terminal and rarely in a log file (CI, nohup)."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.2 if interactive else 30.0)


def truncate_log(path: str, last_step: int) -> None:
    """Drop log.jsonl entries after `last_step` (a resumed run rewrites them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    entries = []
    for number, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except ValueError:
            if number == len(lines) - 1:  # a line torn by a kill mid-write: the resumed run writes it again
                break
            raise UserError(f"{path} line {number + 1} is not JSON; repair or remove that line, then resume") from None
    kept = [entry for entry in entries if entry.get("step", -1) <= last_step]
    atomic_write_text(path, "".join(strict_json(entry) + "\n" for entry in kept))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: one dict per file, written atomically; the last `keep` are kept.

CHECKPOINT_PATTERN = "ckpt_{step:07d}.pt"


def step_in_name(name: str):
    """The step of a checkpoint file name ckpt_<step>.pt (any zero padding); None for any other name."""
    if name.startswith("ckpt_") and name.endswith(".pt") and name[len("ckpt_"):-len(".pt")].isdigit():
        return int(name[len("ckpt_"):-len(".pt")])
    return None


def list_checkpoints(out_dir: str) -> list:
    """Checkpoint paths in `out_dir`, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    steps = {name: step_in_name(name) for name in os.listdir(out_dir)}
    steps = {name: step for name, step in steps.items() if step is not None}
    return [os.path.join(out_dir, n) for n in sorted(steps, key=lambda n: (steps[n], n))]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run directory meaning its latest checkpoint."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"run directory {path} holds no checkpoint (ckpt_*.pt)")
        return found[-1]
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    return path


def save_checkpoint(state: dict, out_dir: str, step: int, keep: int, protect_step: int = None) -> str:
    """Write `ckpt_<step>.pt` and delete all but the last `keep` (by step), except the one of `protect_step` (the
    best step, which best.pt copies)."""
    path = os.path.join(out_dir, CHECKPOINT_PATTERN.format(step=step))
    atomic_torch_save(state, path)
    protected = os.path.join(out_dir, CHECKPOINT_PATTERN.format(step=protect_step)) if protect_step else None
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        if old != protected:
            os.remove(old)
    return path


def check_finite_state(model, values: dict, step: int, out_dir: str) -> None:
    """Refuse to checkpoint (or draw) a model whose parameters, buffers or validation losses (`values`) are not
    finite; the sentence names the last good checkpoint. Every rank agrees (equal weights, reduced metrics)."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    bad += [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        found = list_checkpoints(out_dir)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written before"
        named = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise UserError(f"the run became non-finite by step {step} ({named} not finite), so no checkpoint was written "
                        f"for it and {last}; resume from it with a lower lr (--allow_changed lr) or check the data")


TRAINING_ONLY_KEYS = ("optimizer", "scaler", "rng")


def slim_checkpoint(state: dict) -> dict:
    """An export of a checkpoint for evaluation and the Python API (best.pt): the whole model (frozen weights
    included, so the file stands alone), its config and metadata, without what only resuming needs (optimizer and
    grad-scaler state, RNG states)."""
    return {key: value for key, value in state.items() if key not in TRAINING_ONLY_KEYS}


def frozen_weights_file(tensors: dict) -> str:
    """The file name of a set of frozen weights in a run directory: `frozen-<content hash>.pt`, so one run writes
    them once and different weights never share a name."""
    digest = hashlib.sha1()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(key.encode() + str(value.dtype).encode() + str(tuple(value.shape)).encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"frozen-{digest.hexdigest()[:16]}.pt"


def share_frozen_weights(state: dict, out_dir: str, prefixes: tuple) -> dict:
    """`state` with the model entries under `prefixes` (frozen weights: DINO, the guidance VAE) moved into one file
    per run directory, written the first time (atomically) and referenced by name: `state["frozen"]`.
    `load_checkpoint` puts them back, from the checkpoint's own directory."""
    frozen = {key: value for key, value in state["model"].items() if key.startswith(tuple(prefixes))}
    if not frozen:
        return state
    name = frozen_weights_file(frozen)
    if not os.path.isfile(os.path.join(out_dir, name)):
        atomic_torch_save(frozen, os.path.join(out_dir, name))
    model = {key: value for key, value in state["model"].items() if key not in frozen}
    return dict(state, model=model, frozen=name)


def attach_frozen_weights(state: dict, path: str) -> dict:
    """Put a checkpoint's shared frozen weights (`share_frozen_weights`) back into its model entries."""
    name = state.pop("frozen", None)
    if not name:
        return state
    frozen_path = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(frozen_path):
        raise UserError(f"{path} keeps its frozen weights (DINO, guidance VAE) in {name} beside it, which is missing; "
                        f"copy the file along with the checkpoint, or use the run's best.pt, which holds everything")
    try:
        frozen = torch.load(frozen_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{frozen_path} is not readable ({type(error).__name__}: {str(error)[:200]})") from None
    state["model"] = {**state["model"], **frozen}
    return state


CHECKPOINT_KINDS = {"vae": "a VAE checkpoint (pretrain_vae.py)", "ocl": "an OCL checkpoint (train_ocl.py)"}


def checkpoint_kind(kind: str) -> str:
    """A checkpoint kind in words, with its article: "an OCL checkpoint (train_ocl.py)"."""
    return CHECKPOINT_KINDS.get(kind, f"a '{kind}' checkpoint")


def load_checkpoint(path: str, kind: str = None) -> dict:
    """Load a checkpoint safely (weights_only: no code runs) and check it is of the expected kind."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = str(error).splitlines() or [""]
        # Torch words a refused global in either case ("Unsupported global: GLOBAL argparse.Namespace", "unsupported
        # GLOBAL posix.system ..."): the file names code to run.
        named = re.search(r"GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
        if named:
            name = named.group(1)
            raise UserError(f"{path} holds objects beyond tensors and plain values ({name}), which the safe load "
                            f"(weights_only=True) refuses, so it is from another program or crafted; loading it with "
                            f"torch.load(weights_only=False) can execute arbitrary code, so do that only with a file "
                            f"from a source you trust") from None
        reason = next((line.strip() for line in lines if "Unsupported" in line), lines[0])
        # A refused opcode ("Unsupported operand 149") is garbage or a crafted pickle in a form the safe load cannot
        # parse: which one is unknowable, so the warning stays.
        warning = ("; loading it with torch.load(weights_only=False) can execute arbitrary code, so do that only with a "
                   "file from a source you trust") if str(error).startswith("Weights only load failed") else ""
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}: {reason[:200]}); it may be "
                        f"truncated, from another program or crafted{warning}") from None
    if not isinstance(state, dict) or "config" not in state or "kind" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no config/kind entry)")
    missing = [key for key in ("model", "data", "step") if key not in state]
    if missing or not isinstance(state["data"], dict) or "resolution" not in state["data"]:
        raise UserError(f"{path} lacks {missing or ['data.resolution']}, so it is damaged or from an older version; "
                        f"use another checkpoint or retrain")
    if kind is not None and state["kind"] != kind:
        raise UserError(f"{path} is {checkpoint_kind(state['kind'])}, but {checkpoint_kind(kind)} is needed here")
    attach_frozen_weights(state, path)
    state["path"] = path
    return state


def load_weights(module, weights: dict, path: str) -> None:
    """module.load_state_dict, with a mismatch (missing keys, another tensor shape) as one sentence."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        raise UserError(f"{path} does not fit the model its config describes ({str(error).splitlines()[0][:200]}); "
                        f"it is damaged or from another version, use another checkpoint or retrain") from None


def resolve_stored_path(stored: str, checkpoint: str, out_dir: str) -> str:
    """A path a checkpoint stores (data_dir, vae_ckpt: relative to the directory training ran in) resolved against
    the checkpoint's own location. The run directory `out_dir`, as the config gave it, ends the checkpoint's
    directory, so what precedes it is where training ran. Absolute paths are kept; a relative one is looked up
    there, then from the current directory, then from each directory above the checkpoint (a moved run). When
    none exists, the path from where training ran (or as stored) is returned, so the error names it."""
    if not stored or os.path.isabs(stored):
        return stored
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    candidates = []
    if out_dir and not os.path.isabs(out_dir):
        out = os.path.normpath(out_dir)
        if out == ".":
            candidates.append(os.path.join(run_dir, stored))
        elif run_dir.endswith(os.sep + out):
            candidates.append(os.path.join(run_dir[:-len(out) - 1], stored))
    candidates.append(stored)
    parent = run_dir
    while True:
        candidates.append(os.path.join(parent, stored))
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    return os.path.normpath(candidates[0])


def check_same_config(saved: dict, current: dict, keys, what: str) -> None:
    """Refuse a checkpoint whose config differs from the current one in keys that shape the model."""
    for key in keys:
        if saved.get(key) != current.get(key):
            raise UserError(f"{what} was made with {key}={saved.get(key)!r} but the config says "
                            f"{key}={current.get(key)!r}; use a matching config or another checkpoint")
