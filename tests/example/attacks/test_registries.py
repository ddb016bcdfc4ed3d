"""A given morph method or a synthetic method is one function and one registry entry.

The tests add a method to each registry for their duration and check that it reaches every
place that reads the registry: config validation, the morph makers and the attack sets.
"""

from __future__ import annotations

import numpy as np
import pytest
from madlab.attacks import morphs, synthesis
from madlab.attacks.sets import DEFAULT_MATCH, check_attack_config
from madlab.attacks.synthesis import DEFAULT_MIX, Attack, parse_mix, synthesise
from madlab.io.config import Config, ConfigError


def test_the_config_defaults_are_the_registries() -> None:
    config = Config()
    assert config.morph_methods == list(morphs.METHODS) == list(morphs.MORPH_METHODS)
    assert parse_mix(config.synthetic_methods) == DEFAULT_MIX
    assert check_attack_config(config) == DEFAULT_MIX
    assert config.synthetic_match == DEFAULT_MATCH


def test_generated_flow_p_is_refused_by_modes_that_generate_no_morphs() -> None:
    for mode in ("given", "synthetic", "both"):
        with pytest.raises(ConfigError, match=rf"generated_flow_p=0.5 aligns generated morphs, but attacks={mode}"
                                              r" generates none; use it with attacks in \['generated', "):
            check_attack_config(Config(attacks=mode, generated_flow_p=0.5))
    for mode in ("generated", "synthetic+generated", "given+generated"):
        assert check_attack_config(Config(attacks=mode, generated_flow_p=0.5)) == DEFAULT_MIX
    assert check_attack_config(Config(attacks="given", generated_flow_p=0.0)) == DEFAULT_MIX


def test_unknown_methods_are_refused_with_the_registered_ones_named() -> None:
    subset = r"must be a non-empty subset of \['blend', 'splice'\]"
    with pytest.raises(ConfigError, match=r"morph_methods \['warp'\] " + subset):
        check_attack_config(Config(morph_methods=["warp"]))
    registered = r"\['self_blend', 'self_mirror', 'self_morph', 'self_splice', 'self_texture', 'self_warp'\]"
    with pytest.raises(ConfigError, match=r"'self_swap' should be a method of " + registered):
        check_attack_config(Config(synthetic_methods=["self_swap"]))
    for bad in (["self_morph:0"], ["self_morph:-1"], ["self_morph:x"], ["self_morph", "self_morph"], []):
        with pytest.raises(ValueError, match="synthetic_methods"):
            parse_mix(bad)


def test_a_mix_gives_each_method_its_share_and_weights_normalise() -> None:
    assert parse_mix(["self_morph:3", "self_blend"]) == (("self_morph", 0.75), ("self_blend", 0.25))
    rng = np.random.default_rng(0)
    photo = rng.random((24, 24, 3)).astype(np.float32)
    drawn = [synthesise(photo, rng, frequency_p=0.0, mix=parse_mix(["self_morph:3", "self_blend"])).method
             for _ in range(400)]
    assert abs(drawn.count("self_morph") / 400 - 0.75) < 0.07  # 3.3 binomial standard errors
    only = {synthesise(photo, rng, frequency_p=0.0, mix=parse_mix(["self_blend"])).method for _ in range(30)}
    assert only == {"self_blend"}


def test_an_even_mix_draws_as_the_even_choice_did() -> None:
    """Same seed, same attacks: the registry did not change what a seed makes."""
    photo = np.random.default_rng(1).random((24, 24, 3)).astype(np.float32)
    even = parse_mix(["self_blend", "self_morph"])
    for seed in range(20):
        rng, reference = np.random.default_rng(seed), np.random.default_rng(seed)
        made = synthesise(photo, rng, frequency_p=0.0, mix=even)
        expected = (synthesis.self_blend(photo, reference) if reference.random() < 0.5
                    else synthesis.self_morph(photo, reference))
        assert made.method == expected.method
        np.testing.assert_array_equal(made.image, expected.image)


def test_the_default_mix_is_self_textures_alone() -> None:
    photo = np.random.default_rng(1).random((40, 40, 3)).astype(np.float32)
    points = np.array([[13.0, 16.0], [27.0, 16.0], [20.0, 23.0], [15.0, 29.0], [25.0, 29.0]])
    for seed in range(5):
        made = synthesise(photo, np.random.default_rng(seed), points, frequency_p=0.0)
        rng = np.random.default_rng(seed)
        rng.random()  # the draw that picks the method
        np.testing.assert_array_equal(made.image, synthesis.self_texture(photo, rng, points).image)


def test_a_new_synthetic_method_is_one_function_and_one_entry(monkeypatch) -> None:
    def inverted(image, rng, landmarks, regions):
        weight = np.ones(image.shape[:2], dtype=np.float32)
        return Attack(1.0 - image, weight, "inverted", 1.0)

    monkeypatch.setitem(synthesis.SYNTHETIC_METHODS, "inverted", inverted)
    config = Config(synthetic_methods=["inverted"])
    mix = check_attack_config(config)
    photo = np.full((8, 8, 3), 0.25, dtype=np.float32)
    attack = synthesise(photo, np.random.default_rng(0), frequency_p=0.0, mix=mix)
    assert attack.method == "inverted" and np.allclose(attack.image, 0.75)


def test_a_new_given_morph_method_is_one_function_and_one_entry(monkeypatch) -> None:
    def darker(a, b, alpha, face):
        return np.minimum(a, b)

    monkeypatch.setitem(morphs.MORPH_METHODS, "darker", darker)
    check_attack_config(Config(morph_methods=["blend", "darker"]))  # config now accepts it
    a, b = np.full((16, 16), 0.2), np.full((16, 16), 0.6)
    assert np.array_equal(morphs.morph("darker", a, b), a)
    landmarks = np.array([[5.0, 6.0], [11.0, 6.0], [8.0, 9.0], [6.0, 12.0], [10.0, 12.0]])
    warped, _ = morphs.landmark_morph("darker", a, landmarks, b, landmarks)
    np.testing.assert_allclose(warped, 0.2, atol=1e-6)  # an identity warp of a flat frame


def test_splice_through_the_registry_equals_its_formula() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random((20, 20, 3)), rng.random((20, 20, 3))
    mask = morphs.inner_face_mask(20, 20)[..., None]
    np.testing.assert_array_equal(morphs.morph("splice", a, b), mask * (0.5 * a + 0.5 * b) + (1.0 - mask) * a)
    with pytest.raises(ValueError, match=r"unknown morph method 'warp'; choose from \('blend', 'splice'\)"):
        morphs.morph("warp", a, b)
