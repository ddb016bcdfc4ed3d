"""The morph-detection example's ``--override`` parser and config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from madlab.io.config import (
    ATTACK_MODES,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULTS_BY_ATTACKS,
    Config,
    ConfigError,
    apply_overrides,
    parse_override,
)


def test_defaults_keep_the_seed_guides_names_and_fit_the_default_backbone() -> None:
    c = Config()
    assert (c.use_lora, c.lora_r, c.lora_alpha, c.lora_dropout) == (True, 8, 16.0, 0.1)
    assert c.lora_target_modules == ["query", "value"] and c.backbone == "dinov2-vits14-imgfocus"
    assert c.lr == 1e-3 and c.freeze_strategy == "backbone_only"
    seed = apply_overrides(c, ["lora_r=4", "lora_alpha=32", "lora_target_modules=query,key,value"])
    assert (seed.lora_r, seed.lora_alpha, seed.lora_target_modules) == (4, 32.0, ["query", "key", "value"])


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("No", False)],
)
def test_bools(text: str, value: bool) -> None:
    assert parse_override(f"use_lora={text}") == ("use_lora", value)


def test_bad_bool_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="true/false/1/0/yes/no"):
        parse_override("use_lora=maybe")


def test_numbers_are_typed_by_the_declared_type() -> None:
    assert parse_override("lora_r=8") == ("lora_r", 8)
    assert isinstance(parse_override("lora_alpha=16")[1], float)
    assert parse_override("learning_rate=1e-4") == ("learning_rate", 1e-4)
    with pytest.raises(ConfigError, match="not an integer"):
        parse_override("lora_r=8.5")
    with pytest.raises(ConfigError, match="not a number"):
        parse_override("learning_rate=fast")
    with pytest.raises(ConfigError, match="finite"):
        parse_override("learning_rate=nan")


def test_lists_parse_to_typed_items() -> None:
    assert parse_override("lora_target_modules=query,value") == ("lora_target_modules", ["query", "value"])
    assert parse_override('lora_target_modules=["q", "v"]') == ("lora_target_modules", ["q", "v"])
    # The seed turned "2.73,0.61" into strings and broke the loss; these must be floats.
    assert parse_override("class_weights=2.73,0.61") == ("class_weights", [2.73, 0.61])
    with pytest.raises(ConfigError, match="not a number"):
        parse_override("class_weights=a,b")


def test_none_defaults_parse_properly() -> None:
    # The seed kept "8" as a string for None defaults.
    assert parse_override("image_size=48") == ("image_size", 48)
    assert parse_override("image_size=None") == ("image_size", None)
    assert parse_override("class_weights=none") == ("class_weights", None)
    assert parse_override("data=/some/where") == ("data", "/some/where")


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'lora_rank'") as err:
        parse_override("lora_rank=8")
    assert "lora_r" in str(err.value) and "freeze_strategy" in str(err.value)


def test_missing_equals() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("lora_r")


def test_value_may_contain_equals() -> None:
    assert parse_override("data=/a=b/c") == ("data", "/a=b/c")


def test_apply_overrides_validates_choices() -> None:
    c = apply_overrides(Config(), ["lora_r=8", "num_epochs=3"])
    assert (c.lora_r, c.num_epochs) == (8, 3)
    with pytest.raises(ConfigError, match="freeze_strategy='sometimes' is not one of"):
        apply_overrides(Config(), ["use_lora=false", "freeze_strategy=sometimes"])
    with pytest.raises(ConfigError, match="lora_r must be >= 1"):
        apply_overrides(Config(), ["lora_r=0"])
    with pytest.raises(ConfigError, match="must be 'backbone_only'"):
        apply_overrides(Config(), ["freeze_strategy=none"])


def test_overrides_apply_in_order_and_do_not_mutate() -> None:
    base = Config()
    c = apply_overrides(base, ["lora_r=8", "lora_r=2"])
    assert c.lora_r == 2 and base.lora_r == 8


def test_round_trip_through_dict() -> None:
    c = apply_overrides(Config(), ["use_lora=false", "freeze_strategy=gradual_unfreeze", "class_weights=1,2"])
    assert Config.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown config keys"):
        Config.from_dict({**c.to_dict(), "bogus": 1})


@pytest.mark.parametrize(("item", "message"), [
    ("weight_decay=-0.1", "weight_decay must be >= 0, got -0.1"),
    ("eta_min=-1e-5", "eta_min must be >= 0, got -1e-05"),
    ("eta_min=0.01", "eta_min=0.01 must be below learning_rate=0.001"),
    ("patience=0", "patience must be >= 1, got 0"),
    ("num_epochs=0", "num_epochs must be >= 1, got 0"),
    ("freeze_lastN=-2", "freeze_lastN must be >= 0, got -2"),
    ("warmup_epochs=-1", "warmup_epochs must be >= 0, got -1"),
    ("mid_epochs=-1", "mid_epochs must be >= 0, got -1"),
    ("seed=-3", "seed must be >= 0, got -3"),
    # negative: a worse dev epoch would count as better, so the worst could be restored
    ("min_delta=-0.001", "min_delta must be >= 0, got -0.001"),
    ("lora_alpha=0", "lora_alpha must be positive, got 0.0"),
    ("output_dir=", "output_dir must name a folder, got an empty string"),
    ("lr_scheduler=step", "lr_scheduler='step' is not one of ('cosine', 'none')"),
    ("synthetic_match=mask", "synthetic_match='mask' is not one of ('face', 'whole')"),
])
def test_out_of_range_values_are_config_errors(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [item])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("warmup", "mid"), [(5, 5), (6, 5), (3, 0)])
def test_gradual_unfreeze_refuses_a_schedule_that_skips_its_middle_stage(warmup: int, mid: int) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["use_lora=false", "freeze_strategy=gradual_unfreeze",
                                   f"warmup_epochs={warmup}", f"mid_epochs={mid}"])
    assert str(err.value).startswith("gradual_unfreeze needs warmup_epochs < mid_epochs")
    assert str(err.value).endswith(f"got warmup_epochs={warmup} and mid_epochs={mid}")


def test_warmup_and_mid_epochs_matter_only_to_gradual_unfreeze() -> None:
    schedule = ["warmup_epochs=5", "mid_epochs=5"]
    assert apply_overrides(Config(), ["use_lora=false", "freeze_strategy=none", *schedule]).mid_epochs == 5
    ok = apply_overrides(Config(), ["use_lora=false", "freeze_strategy=gradual_unfreeze",
                                    "warmup_epochs=4", "mid_epochs=5"])
    assert (ok.warmup_epochs, ok.mid_epochs) == (4, 5)
    with pytest.raises(ConfigError, match="warmup_epochs=5 and mid_epochs=5"):
        Config.from_dict({**Config().to_dict(), "use_lora": False, "freeze_strategy": "gradual_unfreeze",
                          "warmup_epochs": 5, "mid_epochs": 5})  # as a model file's config is read


def test_weight_decay_below_zero_is_one_error_line_on_the_command_line(tmp_path: Path, capsys) -> None:
    import morph_detection

    rc = morph_detection.main(["train", "--output_dir", str(tmp_path), "--override", "weight_decay=-0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "error: weight_decay must be >= 0, got -0.1"


@pytest.mark.parametrize("key", sorted(Config.__dataclass_fields__))
def test_every_key_refuses_a_value_of_the_wrong_type(key: str) -> None:
    """A config rebuilt from a file (Config.from_dict) bypasses the override parser: validate() checks types."""
    values = Config().to_dict()
    values[key] = object()
    with pytest.raises(ConfigError) as err:
        Config.from_dict(values)
    assert str(err.value).startswith(f"{key}=<object object at ")


@pytest.mark.parametrize("key", ["shared_resample_p", "generated_flow_p"])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_probabilities_must_be_probabilities(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key} must be a probability in \[0, 1\], got {value}"):
        apply_overrides(Config(), [f"{key}={value}"])


def test_epochs_and_learning_rate_left_at_none_follow_the_attack_mode_and_say_so() -> None:
    assert (Config().num_epochs, Config().learning_rate) == (None, None)
    assert DEFAULTS_BY_ATTACKS["synthetic"] == {"num_epochs": 20, "learning_rate": 5e-4, "test_time_flip": True}
    assert DEFAULTS_BY_ATTACKS["generated"] == {"num_epochs": 15, "test_time_flip": True}
    for mode in ATTACK_MODES:
        config = apply_overrides(Config(), [f"attacks={mode}"])
        own = DEFAULTS_BY_ATTACKS.get(mode, {})
        assert config.epochs == own.get("num_epochs", DEFAULT_EPOCHS)
        assert config.lr == own.get("learning_rate", DEFAULT_LEARNING_RATE)
        assert config.schedule_note == (f"at most {config.epochs} epochs, learning rate {config.lr:g}"
                                        f" (the defaults for attacks={mode})")
    chosen = apply_overrides(Config(), ["attacks=synthetic", "num_epochs=1"])
    assert (chosen.epochs, chosen.lr) == (1, 5e-4)
    assert chosen.schedule_note == ("learning rate 0.0005 (the defaults for attacks=synthetic);"
                                    " at most 1 epoch (as set)")
    both = apply_overrides(chosen, ["learning_rate=2e-3", "num_epochs=none"])
    assert (both.epochs, both.lr) == (20, 2e-3)
    assert apply_overrides(Config(), ["learning_rate=1e-3", "num_epochs=5"]).schedule_note == (
        "at most 5 epochs, learning rate 0.001 (as set)")


def test_test_time_flip_left_at_none_is_on_for_synthetic_and_generated_and_a_set_value_wins() -> None:
    assert Config().test_time_flip is None
    for mode in ATTACK_MODES:
        config = apply_overrides(Config(), [f"attacks={mode}"])
        assert config.flip_scores is (mode in ("synthetic", "generated")), mode
        for value in (True, False):
            assert apply_overrides(config, [f"test_time_flip={value}"]).flip_scores is value
    with pytest.raises(ConfigError, match="test_time_flip"):
        apply_overrides(Config(), ["test_time_flip=sometimes"])


def test_test_time_shift_follows_the_attack_mode_a_set_value_wins_and_negative_is_refused() -> None:
    assert Config().test_time_shift is None
    for mode in ATTACK_MODES:
        config = apply_overrides(Config(), [f"attacks={mode}"])
        assert config.shift_scores == DEFAULTS_BY_ATTACKS.get(mode, {}).get("test_time_shift", 0), mode
        for value in (0, 3):
            assert apply_overrides(config, [f"test_time_shift={value}"]).shift_scores == value
    with pytest.raises(ConfigError, match=r"test_time_shift must be >= 0 pixels.*got -2"):
        apply_overrides(Config(), ["test_time_shift=-2"])


def test_eta_min_is_checked_against_the_modes_learning_rate() -> None:
    apply_overrides(Config(), ["eta_min=7e-4"])  # below the default 1e-3
    with pytest.raises(ConfigError, match=r"eta_min=0\.0007 must be below learning_rate=0\.0005"):
        apply_overrides(Config(), ["attacks=synthetic", "eta_min=7e-4"])
