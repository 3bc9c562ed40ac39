"""Every number every script takes has a declared range, and a value outside it stops with one sentence naming the
option: the config keys of the trainers (config.option, also the model's and the VAE's) and the flags of the scripts
that take plain flags (config.ranged). Fast: nothing trains, nothing is read."""

import argparse

import pytest

import bench
import evaluate
import prepare_data
import pretrain_vae
import study
import train_ocl
from config import load_config
from errors import UserError

NUMBER_TYPES = ("int", "float", "int_list", "float_list")
# The trainers' options: their own, the shared training keys, and the model's (train_ocl) or the VAE's (pretrain_vae).
CONFIG_SCRIPTS = {"train_ocl": train_ocl.OPTIONS, "pretrain_vae": pretrain_vae.OPTIONS}
# The scripts with plain flags, and the positional arguments that get their parsers as far as the flags.
FLAG_SCRIPTS = {"evaluate": (evaluate, ["run"]), "prepare_data": (prepare_data, ["shapes"]),
                "study": (study, ["demo"]), "bench": (bench, [])}


def out_of_range(declared) -> list:
    """One value just outside each bound an option declares (numbers; a list option gets a one-item list)."""
    integer = declared.type.startswith("int")
    step = 1 if integer else 0.5
    values = []
    if declared.min is not None:
        values.append(declared.min - step)
    if declared.above is not None:
        values.append(declared.above)
    if declared.max is not None:
        values.append(declared.max + step)
    if declared.below is not None:
        values.append(declared.below)
    if declared.choices:
        values.append(max(declared.choices) + step)
    values = [int(v) if integer else float(v) for v in values]
    return [f"[{v}]" if declared.type.endswith("_list") else str(v) for v in values]


def config_cases() -> list:
    cases, seen = [], set()
    for script, options in CONFIG_SCRIPTS.items():
        for name, declared in options.items():
            if declared.type in NUMBER_TYPES and name not in seen:
                seen.add(name)
                cases.append(pytest.param(script, name, id=f"{script}:{name}"))
    return cases


class _Parser(Exception):
    """Carries a script's argparse parser out of its main() (parse_args is replaced by a raise of this)."""


def parser_of(module) -> argparse.ArgumentParser:
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        module.main([])
    except _Parser as caught:
        return caught.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module.__name__}.main() parsed no arguments")


def numeric_flags(parser: argparse.ArgumentParser) -> list:
    """The parser's actions that take numbers: a number type or a number default (store_true flags aside)."""
    return [action for action in parser._actions if action.option_strings and not isinstance(
        action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)) and (
        action.type in (int, float) or hasattr(action.type, "option") or (
            isinstance(action.default, (int, float)) and not isinstance(action.default, bool)))]


def flag_cases() -> list:
    cases = []
    for script, (module, _) in FLAG_SCRIPTS.items():
        for action in numeric_flags(parser_of(module)):
            cases.append(pytest.param(script, action.option_strings[0], id=f"{script}:{action.option_strings[0]}"))
    return cases


@pytest.mark.parametrize("script,name", config_cases())
def test_every_number_in_a_config_has_a_range_and_a_value_outside_it_is_one_sentence(script, name):
    declared = CONFIG_SCRIPTS[script][name]
    assert declared.has_range(), f"{script} option '{name}' declares no range: give it min/above/max/below or choices"
    for value in out_of_range(declared):
        with pytest.raises(UserError, match=f"config key '{name}' must ") as caught:
            load_config(CONFIG_SCRIPTS[script], [f"--{name}", value], config_required=False)
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("script,flag", flag_cases())
def test_every_number_flag_of_a_script_has_a_range_and_a_value_outside_it_is_one_sentence(script, flag):
    module, positional = FLAG_SCRIPTS[script]
    (action,) = [a for a in parser_of(module)._actions if flag in a.option_strings]
    assert hasattr(action.type, "option"), f"{script}.py {flag} declares no range: use config.ranged as its type"
    values = out_of_range(action.type.option)
    assert values
    for value in values:
        with pytest.raises(UserError, match=f"{flag} must ") as caught:
            module.main(positional + [flag, value])
        assert "\n" not in str(caught.value)


def test_the_listed_examples_are_refused():
    for name, value in (("commitment", "-1"), ("dead_fraction", "5"), ("replace_every", "0"),
                        ("codebook_size", "0")):
        with pytest.raises(UserError, match=f"'{name}'"):
            load_config(pretrain_vae.OPTIONS, [f"--{name}", value], config_required=False)
    for name, value in (("guidance_noise", "-1"), ("decoder_layers", "-1"), ("decoder_dropout", "1.5"),
                        ("cnn_channels", "0")):
        with pytest.raises(UserError, match=f"'{name}'"):
            load_config(train_ocl.OPTIONS, [f"--{name}", value], config_required=False)
    assert flag_cases(), "no flag was found: the parser capture is broken"
