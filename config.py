"""Config: every key declared with type, default and help (timm style); a YAML file sets values and `--key value`
overrides them (nanoGPT's configurator.py). Also the keys both trainers take alike, and those a resumed run may
change."""

import argparse
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from errors import UserError
from files import atomic_write_text


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
    max: float = None  # largest value allowed (a fraction or a probability: 1)
    below: float = None  # values must be smaller than this

    def has_range(self) -> bool:
        """Whether the values a number (or list of numbers) may take are declared: bounds or choices."""
        return bool(self.choices) or any(bound is not None for bound in (self.min, self.above, self.max, self.below))


def option(default, help, type=None, choices=(), optional=None, min=None, above=None, finite=None, max=None,
           below=None):
    """Declare a config key; the type is taken from the default unless given. `min` / `above` (lower bounds),
    `max` / `below` (upper bounds) and `finite` declare its range (a float with a bound is also finite)."""
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
        finite = any(bound is not None for bound in (min, above, max, below))
    return Option(default, help, type, tuple(choices), optional, min, above, finite, max, below)


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
    "warmup_fraction": option(0.05, "linear warm-up as a fraction of steps", min=0.0, max=1.0),
    "lr_final_ratio": option(1e-3, "final learning rate as a fraction of the peak", min=0.0, max=1.0),
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


def check_value(name: str, opt: Option, value, label: str = ""):
    """Validate one config value against its declaration; raise UserError naming the key (or `label`, e.g. a
    script's flag)."""
    what = label or f"config key '{name}'"
    if value is None:
        if opt.optional:
            return None
        raise UserError(f"{what} must be {_type_name(opt)}, got null")
    try:
        if opt.type.endswith("_list"):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            value = [_check_scalar(opt.type[: -len("_list")], v) for v in value]
        else:
            value = _check_scalar(opt.type, value)
    except TypeError:
        raise UserError(f"{what} must be {_type_name(opt)}, got {type(value).__name__} {value!r}") from None
    if opt.choices:
        for v in value if isinstance(value, list) else [value]:
            if v not in opt.choices:
                raise UserError(f"{what} must be one of {list(opt.choices)}, got {v!r}")
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and opt.finite and not math.isfinite(v):
            raise UserError(f"{what} must be a finite number, got {v!r}")
        if opt.min is not None and v < opt.min:
            raise UserError(f"{what} must be at least {opt.min}, got {v!r}")
        if opt.above is not None and v <= opt.above:
            raise UserError(f"{what} must be greater than {opt.above}, got {v!r}")
        if opt.max is not None and v > opt.max:
            raise UserError(f"{what} must be at most {opt.max}, got {v!r}")
        if opt.below is not None and v >= opt.below:
            raise UserError(f"{what} must be smaller than {opt.below}, got {v!r}")
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


def ranged(kind: type, flag: str, min=None, above=None, max=None, below=None):
    """An argparse `type` for the scripts that take plain flags (evaluate.py, prepare_data.py, study.py, bench.py):
    the text as `kind` (int or float) within the declared range, else the one sentence of a config key out of its
    range, naming `flag`. The bounds are kept on it (`.option`), so a test can check that every number has some."""
    declared = option(kind(0), "", min=min, above=above, max=max, below=below)

    def parse(text: str):
        value = _parse_cli_value(declared, text)
        return check_value(flag, declared, value, label=flag)

    parse.option, parse.__name__ = declared, kind.__name__  # argparse names the type in its own messages
    return parse


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
    edit near the top of a config would be overridden by a forgotten line below). Merge keys (`<<: *defaults`) work
    as in YAML: the mapping's own keys override the merged ones; load_config skips the top-level keys that start
    with '.', where such anchors can live (`.defaults: &defaults`)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # merged by SafeLoader below, not a key of its own
                continue
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
            if isinstance(name, str) and name.startswith("."):  # `.defaults: &defaults` holds what `<<:` merges
                continue
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
