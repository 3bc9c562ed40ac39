"""Run plumbing shared by the stage scripts: config loading, user-facing errors, DDP, checkpoints, logs.

It plays the part of nanoGPT's configurator.py plus the small helpers a trainer calls; each trainer's main
(pretrain_vae.py, train_ocl.py) does its own set-up with them. Nothing here knows about models or data, and this
module imports no other module of the project, so every module can import it.
"""

import argparse
import datetime
import difflib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------------
# Errors a user can cause end in one sentence, not a traceback.

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


# ----------------------------------------------------------------------------------------------------------------
# Config: every key declared with type, default and help (timm style); YAML sets values, `--key value` overrides.

@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    type: str  # "int" | "float" | "str" | "bool" | "int_list" | "float_list" | "str_list"
    choices: tuple = ()
    optional: bool = False  # None allowed
    min: float = None  # smallest value allowed (numbers, and every item of a list)
    above: float = None  # values must be greater than this
    finite: bool = False  # NaN and infinities refused


def option(default, help, type=None, choices=(), optional=None, min=None, above=None, finite=None):
    """Declare a config key; the type is taken from the default unless given. `min` / `above` / `finite` declare
    its range (a float with a bound is also finite)."""
    if type is None:
        if isinstance(default, bool):
            type = "bool"
        elif isinstance(default, int):
            type = "int"
        elif isinstance(default, float):
            type = "float"
        elif isinstance(default, str):
            type = "str"
        else:
            raise ValueError(f"option type needed for default {default!r}")
    if optional is None:
        optional = default is None
    if finite is None:
        finite = min is not None or above is not None
    return Option(default, help, type, tuple(choices), optional, min, above, finite)


# The keys both trainers (pretrain_vae.py, train_ocl.py) take alike; each adds its own schedule and sizes.
TRAINING_OPTIONS = {
    "data_dir": option("data/shapes", "directory with train.lmdb / val.lmdb"),
    "train_split": option("train", "training split name"),
    "val_split": option("val", "validation split name"),
    "num_frames": option(6, "video datasets: frames per training clip (the VAE takes them as images; OCL evaluation "
                         "uses every frame)", min=1),
    "grad_clip": option(1.0, "global L2 norm clip (0 = off); the paper clips OCL training at 1.0 for images, 0.02 "
                        "for videos", min=0.0),
    "keep_checkpoints": option(5, "checkpoints kept in out_dir (oldest deleted; an OCL run keeps best.pt apart)",
                               min=0),
    "warmup_fraction": option(0.05, "linear warm-up as a fraction of steps", min=0.0),
    "lr_final_ratio": option(1e-3, "final learning rate as a fraction of the peak", min=0.0),
    "amp": option("auto", "mixed precision: auto (bf16/fp16 on GPU, off on CPU), bf16, fp16, off",
                  choices=("auto", "bf16", "fp16", "off")),
    "num_workers": option(4, "data loader workers per rank", min=0),
    "log_every": option(50, "steps between log lines", min=1),
    "val_samples": option(0, "validation samples (0 = the whole split)", min=0),
    "seed": option(0, "global seed (rank r uses seed * world_size + r)", min=0),
    "device": option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda")),
    "resume": option("", "checkpoint path, or 'auto' for the latest in out_dir"),
    "overwrite": option(False, "start afresh in an out_dir that holds another run: its files move to old-<time>/"),
    "ddp_timeout_minutes": option(20, "torchrun: minutes a rank waits for the others before the run stops", min=1),
    "allow_changed": option([], "settings a resumed run may change although they alter its trajectory (e.g. "
                            "steps,lr); others that differ from the checkpoint's are refused", type="str_list"),
}

def schedule_options(out_dir: str, steps: int, batch_size: int, lr: float, val_every: int, val_batch_size: int) -> dict:
    """The run directory, schedule and batch keys both trainers take, with the stage's own defaults (the paper's)."""
    return {
        "out_dir": option(out_dir, "run directory"),
        "steps": option(steps, "training iterations", min=1),
        "batch_size": option(batch_size, "global batch (images, or video clips) over all ranks", min=1),
        "lr": option(lr, "peak Adam learning rate", above=0.0),
        "val_every": option(val_every, "steps between validations and checkpoints", min=1),
        "val_batch_size": option(val_batch_size, "validation batch per rank (the paper's OCL videos: 4)", min=1),
    }


# Keys a resumed run may change freely: where it writes, how often it reports, how it reads (not what it learns).
RESUME_FREE_KEYS = {"resume", "out_dir", "overwrite", "allow_changed", "num_workers", "log_every", "val_every",
                    "val_batch_size", "val_samples", "keep_checkpoints", "device", "ddp_timeout_minutes",
                    "latent_scale"}


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(opt: Option) -> str:
    name = {"int_list": "list of int", "float_list": "list of float", "str_list": "list of str"}.get(opt.type, opt.type)
    return name + (" or null" if opt.optional else "")


def _check_scalar(kind: str, value):
    """Return value as `kind` or raise TypeError; YAML ints are accepted where floats are expected."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):  # PyYAML reads 1e-3 as a string
            return float(value)
    elif kind == "str":
        if isinstance(value, str):
            return value
    raise TypeError


def check_value(name: str, opt: Option, value):
    """Validate one config value against its declaration; raise UserError naming the key."""
    if value is None:
        if opt.optional:
            return None
        raise UserError(f"config key '{name}' must be {_type_name(opt)}, got null")
    try:
        if opt.type.endswith("_list"):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = [_check_scalar(opt.type[: -len("_list")], v) for v in value]
        else:
            value = _check_scalar(opt.type, value)
    except TypeError:
        raise UserError(f"config key '{name}' must be {_type_name(opt)}, got {type(value).__name__} {value!r}") from None
    if opt.choices:
        for v in value if isinstance(value, list) else [value]:
            if v not in opt.choices:
                raise UserError(f"config key '{name}' must be one of {list(opt.choices)}, got {v!r}")
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and opt.finite and not math.isfinite(v):
            raise UserError(f"config key '{name}' must be a finite number, got {v!r}")
        if opt.min is not None and v < opt.min:
            raise UserError(f"config key '{name}' must be at least {opt.min}, got {v!r}")
        if opt.above is not None and v <= opt.above:
            raise UserError(f"config key '{name}' must be greater than {opt.above}, got {v!r}")
    return value


def _parse_cli_value(opt: Option, text: str):
    """Turn a command-line string into a value of the option's type (YAML syntax, so `[1, 2]` and `null` work)."""
    if opt.type == "str":
        return None if (opt.optional and text in ("null", "None")) else text
    if opt.type.endswith("_list") and not text.strip().startswith("["):
        text = "[" + text + "]"
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def unknown_key_message(name: str, known, where: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{name}' in {where}{hint}"


def _config_parser(options: dict, description: str, shown: dict) -> argparse.ArgumentParser:
    """The command line: the config file, then `--key value` for every option; `shown` are the defaults --help
    prints (the config file's values where it sets them, timm style). No abbreviations: `--step` is not `--steps`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("config", nargs="?", help="YAML file with config values")
    for name, opt in options.items():
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=opt.type.upper(),
                            help=f"{opt.help} (default: {shown[name]!r})")
    return parser


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last silently, so an
    edit near the top of a config would be overridden by a forgotten line below)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"key '{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})"
                                    f"; keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_config(options: dict, argv=None, description: str = "", config_required: bool = True) -> dict:
    """Parse `CONFIG.yaml [--key value ...]` against the declared options and return the resolved config dict.
    `--help` lists every key with the value the config file gives it (or the declared default)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    config = {name: opt.default for name, opt in options.items()}
    parser = _config_parser(options, description, config)
    args = parser.parse_args([a for a in argv if a not in ("-h", "--help")])
    if args.config is None and config_required and not wants_help:
        parser.error("the following arguments are required: config")
    config_path = args.config
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise UserError(f"config file {config_path} does not exist; pick one from configs/")
        try:
            with open(config_path) as f:
                loaded = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config file {config_path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {config_path} must hold a mapping of key: value")
        for name, value in loaded.items():
            if name not in options:
                raise UserError(unknown_key_message(name, options, config_path))
            config[name] = check_value(name, options[name], value)
    if wants_help:
        _config_parser(options, description, config).print_help()
        sys.exit(0)
    for name, text in vars(args).items():
        if name == "config":
            continue
        config[name] = check_value(name, options[name], _parse_cli_value(options[name], text))
    return config


def save_config(config: dict, path: str) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


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
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            raise UserError(f"could not write {path} ({os_error_cause(error)}), and nothing half-written was left; "
                            f"free space or make the directory writable{held_run_note() or ', then rerun'}") from None
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda f: f.write(text))


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to `path` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


# ----------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step so resume is exact.

def warmup_cosine(step: int, total: int, peak: float, warmup_fraction: float = 0.05, final_ratio: float = 1e-3) -> float:
    """Linear warm-up from 0 over `warmup_fraction` of `total`, then cosine from `peak` to `peak * final_ratio`."""
    warmup = max(1, int(round(total * warmup_fraction)))
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    final = peak * final_ratio
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def set_scheduled_lr(optimizer, step: int, config: dict) -> float:
    """Give every parameter group the config's warm-up + cosine learning rate at `step`; returns it."""
    lr = warmup_cosine(step, config["steps"], config["lr"], config["warmup_fraction"], config["lr_final_ratio"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at `total`, constant after."""
    if total <= 0:
        return end
    progress = min(1.0, max(0.0, step / total))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: DDP from torchrun's environment, plain single process otherwise (nanoGPT).

@dataclass
class Dist:
    enabled: bool
    rank: int
    local_rank: int
    world_size: int
    device: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def setup_distributed(device_name: str, timeout_minutes: float = 20) -> Dist:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on GPU); a collective that waits
    longer than `timeout_minutes` for a stalled rank fails instead of blocking the others for torch's default."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(False, 0, 0, 1, pick_device(device_name))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return Dist(True, rank, local_rank, world_size, device)


def deterministic_algorithms(device) -> None:
    """On the CPU, ask torch for deterministic kernels: the backward of an index (codes[indices], gather) otherwise
    accumulates in a thread-dependent order, and two runs on several threads drift apart after a few steps. (CUDA
    runs are not promised bit-identical: some of their kernels have no deterministic version.)"""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def cleanup_distributed(d: Dist) -> None:
    """Leave the process group, if this process joined one."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


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
    return [p for p in list_checkpoints(out_dir) + frozen + named + evaluations if os.path.exists(p)]


def lock_run_dir(out_dir: str) -> None:
    """Take the exclusive lock of `out_dir` (a `.lock` file, flock) for the rest of this process or until the same
    process claims the directory again; another process holding it is refused."""
    key = os.path.realpath(out_dir)
    if key in _RUN_LOCKS:  # the same process starts another run here (tests, study scripts): the old one ended
        _RUN_LOCKS.pop(key).close()
    path = os.path.join(out_dir, ".lock")
    _RUN_LOCKS[key] = exclusive_lock(path, f"another process is running in {out_dir} (it holds {path}); wait for it "
                                           f"to end or choose another --out_dir")


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


def held_run_note() -> str:
    """For a message about a stop the run did not choose (Ctrl-C, a full disk): where the run this process holds
    can continue from; empty when it holds none."""
    if not _RUN_LOCKS:
        return ""
    out_dir = list(_RUN_LOCKS)[-1]  # the latest claimed
    found = list_checkpoints(out_dir)
    if not found:
        return f"; {out_dir} holds no checkpoint of this run yet, so rerun with --resume auto to start it again"
    return (f"; {out_dir} keeps every checkpoint up to {os.path.basename(found[-1])} (step "
            f"{_checkpoint_step(found[-1])}), continue from it with --resume auto")


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


# ----------------------------------------------------------------------------------------------------------------
# Figures: image grids whose rows carry a text label in a left margin.

GRID_PADDING = 2


def _wrap(text: str, font, width: int) -> list:
    """Greedy word wrap of `text` into lines at most `width` pixels wide (a longer word stays on its own line)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def labelled_grid(rows: list, labels: list, margin: int = 96) -> Image.Image:
    """Rows of images, each (n,3,H,W) float in [0,1] (values outside are clipped), tiled one row per tensor with its
    label drawn in a white left margin `margin` pixels wide (PIL's default font, word-wrapped). Cell (r, c) has its
    top-left corner at (margin + p + c·(W+p), p + r·(H+p)) with p = GRID_PADDING; the padding is white."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    p = GRID_PADDING
    columns = max(r.shape[0] for r in rows)
    height, width = rows[0].shape[-2:]
    canvas = np.full((p + len(rows) * (height + p), margin + p + columns * (width + p), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        cells = (row.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        top = p + r * (height + p)
        for c, cell in enumerate(cells):
            left = margin + p + c * (width + p)
            canvas[top:top + height, left:left + width] = cell
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    line_height = font.getbbox("Ag")[3] + 2
    for r, label in enumerate(labels):
        lines = _wrap(label, font, margin - 6)
        top = p + r * (height + p) + max(0, (height - line_height * len(lines)) // 2)
        for i, line in enumerate(lines):
            draw.text((4, top + i * line_height), line, fill=(0, 0, 0), font=font)
    return picture


def save_labelled_grid(rows: list, labels: list, path: str, margin: int = 96) -> str:
    """`labelled_grid` written atomically as a PNG at `path`; returns `path`."""
    picture = labelled_grid(rows, labels, margin)
    atomic_write(path, lambda f: picture.save(f, format="PNG"), binary=True)
    return path


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
        raise UserError(f"the run became non-finite by step {step} ({named} not finite), so no checkpoint was written for it and {last}; resume from it with a lower "
                        f"lr (--allow_changed lr) or check the data")
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
        raise UserError(f"{path} is a {state['kind']} checkpoint, but a {kind} checkpoint is needed here")
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


def resume_state(config: dict, kind: str, model_keys) -> tuple:
    """(checkpoint dict or None, start step) for `resume`: a path, 'auto' (the latest checkpoint in out_dir if
    there is one, else a fresh start) or empty. The checkpoint's model keys must match the config."""
    resume = config["resume"]
    if resume == "auto":
        resume = config["out_dir"] if list_checkpoints(config["out_dir"]) else ""
    if not resume:
        return None, 0
    state = load_checkpoint(resume, kind=kind)
    if any(key not in state for key in TRAINING_ONLY_KEYS):
        raise UserError(f"{state['path']} is an export for evaluation (best.pt) without the optimizer and RNG state "
                        f"that a resume needs; resume from one of the run's ckpt_*.pt files")
    check_same_config(state["config"], config, model_keys, f"checkpoint {state['path']}")
    saved = state["config"]
    changed = [key for key in config if key not in RESUME_FREE_KEYS and key not in config["allow_changed"]
               and key in saved and saved[key] != config[key]]
    if changed:
        listed = ", ".join(f"{key} {saved[key]!r} -> {config[key]!r}" for key in changed)
        raise UserError(f"checkpoint {state['path']} was trained with other settings that change the run's "
                        f"trajectory ({listed}); resume with the checkpoint's settings, accept them with "
                        f"--allow_changed {','.join(changed)}, or start afresh in another --out_dir")
    return state, state["step"]


def restore_training_state(state: dict, model, optimizer, scaler, rank: int, log: RunLog) -> None:
    """Load a checkpoint's weights, optimizer and grad-scaler state and this rank's RNG state, so the run continues
    exactly where it stopped (with more ranks than the checkpoint has RNG states, the extra ones take the last),
    and cut the run's log back to the checkpoint's step."""
    load_weights(model, state["model"], state["path"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    log.rewind(state["step"])
    log.info(f"resumed from {state['path']} at step {state['step']}")


def gather_rng_states(d: "Dist") -> list:
    """Every rank's RNG state (rank order), for a checkpoint that resumes each rank exactly."""
    states = [rng_state()]
    if d.enabled:
        states = [None] * d.world_size
        dist.all_gather_object(states, rng_state())
    return states


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def amp_dtype(setting: str, device):
    """Autocast dtype for `amp: auto|bf16|fp16|off`; None means full precision (the CPU default)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def autocast(device, dtype):
    """Mixed precision in `dtype` (from amp_dtype) on `device`; dtype None runs in full precision."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------------------------
# The optimisation step shared by the two trainers.

def all_finite(value, d: Dist) -> bool:
    """True when `value` is finite on every rank (all ranks stop together otherwise)."""
    flag = torch.tensor([float(torch.isfinite(value.detach()).all())], device=value.device)
    if d.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def optimizer_step(loss, parameters, optimizer, scaler, clip: float) -> float:
    """Backward, unscale, clip the global L2 norm, step; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, clip if clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return float(norm)


def reduce_mean(values: dict, d: Dist) -> dict:
    """Average a dict of scalars over ranks (for logging)."""
    if not d.enabled or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], device=d.device)
    dist.all_reduce(stacked)
    return {k: float(v) / d.world_size for k, v in zip(keys, stacked.tolist())}


# ----------------------------------------------------------------------------------------------------------------
# The trainers' set-up and bookkeeping: small steps each trainer's main calls in its own order.

def start_run(config: dict, kind: str, model_keys) -> tuple:
    """DDP under torchrun (one process per GPU) or one process, deterministic kernels, the run directory claimed and
    locked, its log, and the checkpoint to resume from: (d, log, checkpoint dict or None, start step)."""
    d = setup_distributed(config["device"], config["ddp_timeout_minutes"])
    deterministic_algorithms(d.device)  # bit-identical runs and resumes on multi-threaded CPUs
    claim_run_dir(config, d)  # refuses another run's directory, and locks this one
    log = RunLog(config["out_dir"], d.is_main)
    state, start_step = resume_state(config, kind, model_keys)
    return d, log, state, start_step


def optimizer_and_rng(parameters, config: dict, d: Dist, model, state, log: RunLog) -> tuple:
    """Adam, the AMP dtype and its grad scaler, and each rank's own noise from here on: seeded with
    seed * world_size + rank on a fresh start, restored with the weights and optimizer on resume."""
    optimizer = torch.optim.Adam(parameters, lr=config["lr"])
    dtype = amp_dtype(config["amp"], d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    if state is None:
        torch.manual_seed(config["seed"] * d.world_size + d.rank)
    else:
        restore_training_state(state, model, optimizer, scaler, d.rank, log)
    return optimizer, dtype, scaler


def checkpoint_payload(kind: str, model, optimizer, scaler, step: int, config: dict, rng: list,
                       resolution: int, fingerprint=None) -> dict:
    """What every checkpoint holds: the weights, the optimizer and scaler state, every rank's RNG state, the config
    and the data it trained on (with the training split's fingerprint, which a resume checks)."""
    return {"kind": kind, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "config": config, "rng": rng,
            "data": {"data_dir": config["data_dir"], "train": config["train_split"], "val": config["val_split"],
                     "resolution": resolution, "fingerprint": fingerprint}}


def stop_on_non_finite(loss, step: int, d: Dist, out_dir: str) -> None:
    """Stop every rank together on a non-finite loss, naming the step."""
    if not all_finite(loss, d):
        raise UserError(f"non-finite loss at step {step} ({float(loss.detach())}); lower lr or check the data; the "
                        f"last checkpoint in {out_dir} is intact")


def record_training(log: RunLog, stats: dict, d: Dist, step: int, seconds_per_step: float, **values) -> dict:
    """Log one training step: its stats averaged over ranks with `values`, to log.jsonl and log.txt."""
    entry = reduce_mean(stats, d)
    entry.update(step=step + 1, **values, seconds_per_step=seconds_per_step)
    log.record(entry)
    log.info(f"step {step + 1}: loss {entry['loss']:.4g}, lr {entry['lr']:.3g}, grad_norm {entry['grad_norm']:.3g}",
             echo=False)
    return entry


def record_validation(log: RunLog, metrics: dict, step: int) -> None:
    """Log the validation metrics after `step`, to log.jsonl and log.txt."""
    log.record({"step": step + 1, **metrics})
    log.info(f"step {step + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


def finish_run(log: RunLog, d: Dist, out_dir: str) -> None:
    """Close the log, unlock the run directory and leave the process group."""
    log.close()
    release_run_dir(out_dir)
    cleanup_distributed(d)
