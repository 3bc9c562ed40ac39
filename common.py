"""Run plumbing shared by the stage scripts: config loading, user-facing errors, DDP, checkpoints, logs.

This is the only module besides the networks (model.py, msf.py) that more than one stage imports; it plays the
part of nanoGPT's configurator.py plus the few helpers every trainer needs. Nothing here knows about models.
"""

import argparse
import difflib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import yaml


# ----------------------------------------------------------------------------------------------------------------
# Errors a user can cause end in one sentence, not a traceback (STYLE rule 7).

class UserError(Exception):
    """An error caused by input (config, data, checkpoint) whose message says what to do."""


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError prints one line and exits with status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Config: every key declared with type, default and help (timm style); YAML sets values, `--key value` overrides.

@dataclass(frozen=True)
class Option:
    default: Any
    help: str
    type: str  # "int" | "float" | "str" | "bool" | "int_list" | "float_list" | "str_list"
    choices: tuple = ()
    optional: bool = False  # None allowed


def option(default, help, type=None, choices=(), optional=None):
    """Declare a config key; the type is taken from the default unless given."""
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
    return Option(default, help, type, tuple(choices), optional)


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


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


def load_config(options: dict, argv=None, description: str = "", config_required: bool = True) -> dict:
    """Parse `CONFIG.yaml [--key value ...]` against the declared options and return the resolved config dict."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("config", nargs=None if config_required else "?", help="YAML file with config values")
    for name, opt in options.items():
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=opt.type.upper(),
                            help=f"{opt.help} (default: {opt.default!r})")
    args = parser.parse_args(argv)

    config = {name: opt.default for name, opt in options.items()}
    config_path = args.config
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise UserError(f"config file {config_path} does not exist; pick one from configs/")
        try:
            with open(config_path) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config file {config_path} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {config_path} must hold a mapping of key: value")
        for name, value in loaded.items():
            if name not in options:
                raise UserError(unknown_key_message(name, options, config_path))
            config[name] = check_value(name, options[name], value)
    for name, text in vars(args).items():
        if name == "config":
            continue
        config[name] = check_value(name, options[name], _parse_cli_value(options[name], text))
    return config


def save_config(config: dict, path: str) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Atomic file writes: a reader never sees a half-written file.

def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    import torch

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step so resume is exact (STYLE rule 3).

def warmup_cosine(step: int, total: int, peak: float, warmup_fraction: float = 0.05, final_ratio: float = 1e-3) -> float:
    """Linear warm-up from 0 over `warmup_fraction` of `total`, then cosine from `peak` to `peak * final_ratio`."""
    warmup = max(1, int(round(total * warmup_fraction)))
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    final = peak * final_ratio
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


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
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def setup_distributed(device_name: str) -> Dist:
    """Initialise the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(False, 0, 0, 1, pick_device(device_name))
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(True, rank, local_rank, world_size, device)


def cleanup_distributed(d: Dist) -> None:
    import torch.distributed as dist

    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Logging: rank-0 text log (stdout + log.txt) and one JSON object per line in log.jsonl.

class RunLog:
    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.out_dir = out_dir
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
            f.write(line + "\n")

    def record(self, entry: dict) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
