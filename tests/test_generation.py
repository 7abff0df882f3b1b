"""`generation.resolve`: what is given over a checkpoint's sampler.json over the reference's defaults, checked once."""

import pytest

from pdlm_jax.errors import PDLMError
from pdlm_jax.generation import BASE_DEFAULTS, REGION_DEFAULTS, GenerationSettings, Mode, resolve


def test_given_over_stored_over_defaults():
    assert resolve() == REGION_DEFAULTS and resolve(base=True) == BASE_DEFAULTS
    stored = {"gen_length": 3, "steps": 3, "temperature": 0.5, "remasking": "low_confidence"}
    settings = resolve(stored, steps=2, top_p=None, cache="prefix:2")
    assert (settings.gen_length, settings.steps, settings.temperature) == (3, 2, 0.0)  # sampler.json: lengths only
    assert settings.mode == Mode(cache="prefix", refresh=2) and settings.record()["mode"] == "prefix:2"
    assert resolve(settings, unmask="threshold:0.5").mode.name == "prefix:2+threshold:0.5"
    assert resolve(mode="prefix+threshold").mode == Mode.from_name("prefix+threshold")


def test_base_block_length_is_one_block_unless_it_divides():
    stored = {"gen_length": 128, "block_length": 32, "steps": 128}
    assert resolve({}, base=True, gen_length=64).block_length == 64
    assert resolve(stored, base=True).block_length == 32
    assert resolve(stored, base=True, gen_length=64).block_length == 32
    assert resolve(stored, base=True, gen_length=48, steps=48).block_length == 48
    assert resolve(stored, base=True, gen_length=64, block_length=16).block_length == 16


@pytest.mark.parametrize("base, overrides, message", [
    (False, {"block_length": 8}, "PerceptionDLM-Base checkpoints"),
    (False, {"gen_length": 0}, "gen_length must be a positive integer"),
    (False, {"temperature": -1.0}, "temperature"),
    (False, {"top_p": 0.0}, "top_p"),
    (False, {"cache": "lru"}, "cache mode"),
    (True, {"gen_length": 8, "block_length": 3}, "multiple of block_length"),
    (True, {"cache": "prefix:2"}, "without a period"),
    (True, {"temperature": 0.5}, "greedy"),
])
def test_settings_a_kind_cannot_run(base, overrides, message):
    with pytest.raises(PDLMError, match=message):
        resolve(base=base, **overrides)


def test_steps_fit_the_smallest_pass():
    GenerationSettings(gen_length=8, steps=8).check_regions(7, 6)
    with pytest.raises(PDLMError, match="1-region pass"):
        GenerationSettings(gen_length=8, steps=9).check_regions(7, 6)
    with pytest.raises(TypeError, match="unknown generation setting"):
        resolve(block=8)
