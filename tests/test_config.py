"""Config loading: YAML then `--key value`, declared types, clear errors for unknown keys and wrong types."""

import json
import math

import numpy as np
import pytest
import yaml

from config import load_config, option, save_config
from errors import UserError
from files import strict_json

OPTIONS = {
    "steps": option(100, "training steps"),
    "lr": option(1e-3, "learning rate"),
    "name": option("run", "run name"),
    "amp": option(True, "mixed precision"),
    "scales": option([1], "guidance scales", type="int_list"),
    "ckpt": option(None, "checkpoint", type="str"),
    "fusion": option("concat_pinv", "fusion", choices=("concat_pinv", "mean")),
}


def write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_yaml_and_cli_override(tmp_path):
    path = write(tmp_path, {"steps": 5, "lr": 2, "scales": [1, 2], "ckpt": "a.pt"})
    config = load_config(OPTIONS, [path, "--steps", "7", "--amp", "false", "--scales", "2", "--name", "x"])
    assert config == {"steps": 7, "lr": 2.0, "name": "x", "amp": False, "scales": [2], "ckpt": "a.pt",
                      "fusion": "concat_pinv"}
    assert isinstance(config["lr"], float)  # YAML int accepted for a float key
    assert load_config(OPTIONS, [path, "--scales", "[1, 2]", "--ckpt", "null"])["scales"] == [1, 2]
    assert load_config(OPTIONS, [path, "--ckpt", "null"])["ckpt"] is None


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'step' .*did you mean 'steps'"):
        load_config(OPTIONS, [write(tmp_path, {"step": 5})])


def test_unknown_cli_flag_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        load_config(OPTIONS, [write(tmp_path, {}), "--stepz", "3"])


@pytest.mark.parametrize("data, pattern", [
    ({"steps": "ten"}, "'steps' must be int"),
    ({"steps": 1.5}, "'steps' must be int"),
    ({"amp": "yes"}, "'amp' must be bool"),
    ({"lr": True}, "'lr' must be float"),
    ({"scales": 1}, "'scales' must be list of int"),
    ({"scales": [1, "a"]}, "'scales' must be list of int"),
    ({"fusion": "sum"}, "'fusion' must be one of"),
    ({"name": None}, "'name' must be str, got null"),
])
def test_wrong_types_are_rejected(tmp_path, data, pattern):
    with pytest.raises(UserError, match=pattern):
        load_config(OPTIONS, [write(tmp_path, data)])


def test_wrong_type_on_the_command_line(tmp_path):
    with pytest.raises(UserError, match="'steps' must be int"):
        load_config(OPTIONS, [write(tmp_path, {}), "--steps", "many"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(OPTIONS, [str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(OPTIONS, [str(bad)])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(OPTIONS, [str(listing)])


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("steps: 5\nlr: 0.1\nname: a\nsteps: 9\n")
    with pytest.raises(UserError, match=r"twice.yaml is not valid YAML: key 'steps' is given twice \(lines 1 and 4\); "
                                        r"keep one"):
        load_config(OPTIONS, [str(path)])
    path.write_text("steps: 5\nscales: [1, 2]\n")  # distinct keys, nested values: loaded as before
    assert load_config(OPTIONS, [str(path)])["scales"] == [1, 2]


def test_yaml_merge_keys_work_with_the_config_file_keys_overriding_them(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text(".defaults: &defaults\n  steps: 7\n  lr: 0.5\n<<: *defaults\nlr: 0.25\n")
    config = load_config(OPTIONS, [str(path)])
    assert (config["steps"], config["lr"]) == (7, 0.25)
    path.write_text(".defaults: &defaults\n  steps: 7\n<<: *defaults\nlr: 0.25\nlr: 0.5\n")
    with pytest.raises(UserError, match=r"key 'lr' is given twice \(lines 4 and 5\)"):
        load_config(OPTIONS, [str(path)])


def test_upper_bounds_are_checked(tmp_path):
    options = {"fraction": option(0.5, "a fraction", min=0.0, max=1.0), "p": option(0.1, "dropout", below=1.0)}
    path = write(tmp_path, {})
    for flag, value, pattern in (("fraction", "5", "'fraction' must be at most 1.0, got 5.0"),
                                 ("fraction", "-1", "'fraction' must be at least 0.0"),
                                 ("p", "1", "'p' must be smaller than 1.0, got 1.0"), ("p", ".inf", "finite")):
        with pytest.raises(UserError, match=pattern):
            load_config(options, [path, f"--{flag}={value}"])
    assert load_config(options, [path, "--fraction", "1", "--p", "0.99"])["fraction"] == 1.0


def test_resolved_config_round_trips(tmp_path):
    config = load_config(OPTIONS, [write(tmp_path, {"steps": 3})])
    save_config(config, str(tmp_path / "run" / "config.yaml"))
    assert load_config(OPTIONS, [str(tmp_path / "run" / "config.yaml")]) == config


def test_strict_json_writes_undefined_metrics_as_null():
    value = {"ari": float("nan"), "runs": [{"mbo": np.float64("inf"), "miou": 12.5}], "ok": (1, -math.inf)}
    text = strict_json(value)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"ari": None, "runs": [{"mbo": None, "miou": 12.5}], "ok": [1, None]}


def test_scientific_notation_is_a_float_in_yaml_and_on_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2e-4\n")  # PyYAML reads this as the string '2e-4'
    assert load_config(OPTIONS, [str(path)])["lr"] == 0.0002
    assert load_config(OPTIONS, [str(path), "--lr", "1e-3"])["lr"] == 0.001
    assert load_config(OPTIONS, [str(path), "--lr=-1.5E+2"])["lr"] == -150.0
    with pytest.raises(UserError, match="'lr' must be float"):
        load_config(OPTIONS, [str(path), "--lr", "1e-3x"])


def test_abbreviated_flags_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_config(OPTIONS, [write(tmp_path, {}), "--step", "3"])  # not --steps
    assert "unrecognized arguments: --step" in capsys.readouterr().err


def test_declared_ranges_are_checked(tmp_path):
    options = {"every": option(10, "steps between logs", min=1), "lr": option(1e-3, "lr", above=0.0),
               "clip": option(1.0, "clip", finite=True), "free": option(1.0, "anything")}
    path = write(tmp_path, {})
    for flag, value, pattern in (("every", "0", "'every' must be at least 1, got 0"),
                                 ("every", "-3", "'every' must be at least 1"),
                                 ("lr", "0", "'lr' must be greater than 0.0"), ("lr", "-1e-3", "greater than"),
                                 ("lr", ".nan", "'lr' must be a finite number"), ("clip", ".inf", "finite")):
        with pytest.raises(UserError, match=pattern):
            load_config(options, [path, f"--{flag}={value}"])
    assert math.isnan(load_config(options, [path, "--free", ".nan"])["free"])


def test_help_shows_the_config_files_values_and_keeps_the_usage_lines(capsys):
    import os
    import re
    import train_ocl
    from helpers import ROOT
    with pytest.raises(SystemExit) as exit_:
        train_ocl.main([os.path.join(ROOT, "configs", "slate_msf_shapes.yaml"), "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    entry = re.search(r"--num_slots INT\s+(.*?)\n  --", text, re.S).group(1)
    assert re.search(r"\(default:\s+7\)", entry), entry  # the config's 7, not the declared default
    assert "    python train_ocl.py configs/slate_msf_shapes.yaml [--key value ...]\n    torchrun" in text
