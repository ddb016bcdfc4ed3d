"""Config keys are described in one place; --help, the `config` listing and examples/README.md's
table are generated from it, and this file fails when any of them drifts from the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from madlab.io.config import ATTACK_MODES, EVAL_KEYS, Config, apply_overrides, parse_override
from madlab.io.config_keys import DESCRIPTIONS, default_text, help_listing, markdown_table

from example.cli import cli

README = Path(__file__).resolve().parents[3] / "examples" / "README.md"
BLOCK = re.compile(r"<!-- config-keys:begin -->\n(.*?)\n<!-- config-keys:end -->", re.S)
FIELDS = [f.name for f in dataclasses.fields(Config)]


def test_every_key_has_one_description_and_no_stale_ones() -> None:
    assert sorted(DESCRIPTIONS) == sorted(FIELDS)
    assert all(text.strip() and "\n" not in text for text in DESCRIPTIONS.values())


@pytest.mark.parametrize("key", FIELDS)
def test_the_default_shown_is_the_default_override_takes_back(key: str) -> None:
    # Independent of default_text's own formatting: what --override would make of the shown text.
    field = Config.__dataclass_fields__[key]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    shown = default_text(key)
    if shown == "(empty)":
        assert default == []
    else:
        assert parse_override(f"{key}={shown}") == (key, default)


@pytest.mark.parametrize(("key", "resolved"), [("num_epochs", "epochs"), ("learning_rate", "lr"),
                                                ("test_time_flip", "flip_scores"),
                                                ("test_time_shift", "shift_scores")])
def test_what_none_means_is_said_for_every_attack_mode_as_the_config_resolves_it(key: str, resolved: str) -> None:
    # Read the "none = V for attacks=A or B, W otherwise" clause back, mode by mode.
    clause = DESCRIPTIONS[key].split("none = ", 1)[1]
    said, otherwise = {}, None
    for part in clause.split(", "):
        value, _, modes = part.partition(" for attacks=")
        if modes:
            said.update(dict.fromkeys(modes.split(" or "), value))
        else:
            otherwise = value.removesuffix(" otherwise")
    assert set(said) < set(ATTACK_MODES) and otherwise is not None
    for mode in ATTACK_MODES:
        value = getattr(apply_overrides(Config(), [f"attacks={mode}"]), resolved)
        word = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"
        assert said.get(mode, otherwise) == word, (key, mode)


def test_readme_table_is_the_generated_one() -> None:
    found = BLOCK.findall(README.read_text())
    assert len(found) == 1, "examples/README.md needs exactly one config-keys block"
    assert found[0] == markdown_table(), (
        "examples/README.md's key table is stale: replace it with `python examples/morph_detection.py config"
        " --markdown`")
    rows = found[0].splitlines()[2:]
    assert [re.match(r"\| `(\w+)`", row)[1] for row in rows] == FIELDS


def test_config_command_prints_the_listing_and_the_table() -> None:
    rc, out, _ = cli("config")
    assert rc == 0 and out.strip() == help_listing().strip()
    rc, out, _ = cli("config", "--markdown")
    assert rc == 0 and out.strip() == markdown_table()


@pytest.mark.parametrize("command", ["train", "pretrain", "compare", "protocol"])
def test_training_help_lists_every_key_with_default_and_meaning(command: str) -> None:
    rc, out, _ = cli(command, "--help")
    assert rc == 0
    assert help_listing() in out
    for key in FIELDS:
        assert f"  {key} (default {default_text(key)}): " in out


@pytest.mark.parametrize("command", ["test", "predict"])
def test_evaluation_help_lists_only_the_keys_a_model_file_lets_change(command: str) -> None:
    rc, out, _ = cli(command, "--help")
    assert rc == 0
    assert help_listing(EVAL_KEYS) in out
    listed = set(re.findall(r"^  (\w+) \(default ", out, re.M))
    assert listed == set(EVAL_KEYS)


def test_every_subcommand_describes_itself() -> None:
    import morph_detection

    parser = morph_detection.build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    descriptions = {name: sub.description for name, sub in subs.items()}
    assert all(descriptions.values())
    assert len(set(descriptions.values())) == len(descriptions), "two subcommands share a description"
    for name in ("test", "predict"):
        _, out, _ = cli(name, "--help")
        assert "training prints" not in out, f"{name} --help speaks of training"


# What only that subcommand writes under --output_dir; another subcommand's help naming it speaks of the wrong one.
OWN_OUTPUTS = {"train": "model file", "pretrain": "mae_backbone", "compare": "compare.{json,csv}",
               "protocol": "protocol.{json,csv}", "test": "scores.csv"}


@pytest.mark.parametrize("command", list(OWN_OUTPUTS))
def test_output_dir_help_names_what_that_subcommand_writes(command: str) -> None:
    import morph_detection

    parser = morph_detection.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    (text,) = [a.help for a in sub._actions if a.dest == "output_dir"]
    assert OWN_OUTPUTS[command] in text
    assert not [other for name, other in OWN_OUTPUTS.items() if name != command and other in text], text


def test_pretrain_help_offers_only_the_backbones_it_can_pretrain() -> None:
    rc, out, _ = cli("pretrain", "--help")
    assert rc == 0
    options = " ".join(out.split("config keys (--override")[0].split())  # argparse wraps the lines
    assert "vit_mae checkpoint folder" in options and "mae_backbone" in options
    # timm backbones and the other HF families cannot be MAE-pretrained: pretrain takes no --backbone_weights.
    assert "--backbone_weights" not in options and "timm" not in options and "siglip" not in options
    assert "training prints" not in options
