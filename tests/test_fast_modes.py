"""The opt-in fast modes: prefix K/V cache and confidence-threshold unmasking (approximate by design).

What can be checked exactly: the cached row forward reproduces the full forward when nothing changed;
refreshing every step is the exact mode; a threshold no confidence misses commits the reference's first
argmax in one forward; the threshold sampler's commit rules on synthetic logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixture_config, fixture_dir, fixture_oracle, fixture_tensors, load_reference_tree
from pdlm_jax import PDLMError, sampling
from pdlm_jax.api import RegionCaptioner
from pdlm_jax.modeling.pdm import from_tree
from pdlm_jax.generation import GenerationSettings, Mode
from pdlm_jax.regions.tokenizer import Tokenizer


@functools.cache
def _model(name):
    cfg = fixture_config(name)
    return from_tree(cfg, load_reference_tree(fixture_dir(name), cfg), dtype=jnp.float32)


@functools.cache
def _handle(name) -> RegionCaptioner:
    return RegionCaptioner(fixture_config(name), _model(name), Tokenizer(fixture_dir(name)))


def _run(name, **kw):
    d, oracle = fixture_dir(name), fixture_oracle(name)
    g = oracle["generation"]
    result = _handle(name).caption_regions(d / "image.png", [d / f for f in oracle["masks"]["files"]],
                                           gen_length=g["gen_length_per_mask"], steps=g["steps"], **kw)
    order = oracle["masks"]["sort_idx_desc_area"]
    return result, np.array([result["regions"][j]["token_ids"] for j in order])  # area order, like the oracle


def _oracle_tokens(name):
    return np.array([c["token_ids"] for c in fixture_oracle(name)["outputs"]["caption_tokens"]])


def test_cached_rows_reproduce_the_full_forward():
    """forward_rows over the caption rows, with the cache of the same input, equals the full forward there."""
    t = fixture_tensors("tiny_v1")
    lm = _model("tiny_v1").lm
    embeds = jnp.asarray(t["inputs_embeds"])
    L = embeds.shape[1]
    allowed = jnp.asarray(t["attention_allowed"]).reshape(1, 1, L, L).astype(bool)
    hidden, cache = lm.prefill(embeds, allowed)
    np.testing.assert_allclose(lm.logits(hidden), t["first_logits"], atol=1e-3)  # the reference's own logits
    assert cache[0].shape == (3, 1, L, 4, 16)
    m0 = int(np.flatnonzero(t["input_ids_after_replay"][0] == _handle("tiny_v1").tokenizer.special.mask_cap[0])[0])
    rows = jnp.arange(m0, L + 5)[None]  # five padding rows past the end: dropped from the cache, ignored
    part = lm.forward_rows(embeds[:, jnp.minimum(rows[0], L - 1)], rows, allowed[:, :, jnp.minimum(rows[0], L - 1)],
                           cache)
    np.testing.assert_allclose(part[:, :L - m0], hidden[:, m0:], atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v1_wide"])
def test_prefix_refreshed_every_step_is_exact(name):
    result, tokens = _run(name, cache="prefix:1")
    np.testing.assert_array_equal(tokens, _oracle_tokens(name))
    assert result["mode"] == "prefix:1" and result["forwards"] == fixture_oracle(name)["generation"]["num_forwards"]


def test_prefix_cache_without_refresh_is_approximate():
    """Same schedule and forward count, but the frozen prefix rows no longer see the captions change."""
    result, tokens = _run("tiny_v1", cache="prefix")
    assert result["mode"] == "prefix" and result["forwards"] == 8
    assert 0 < np.mean(tokens == _oracle_tokens("tiny_v1")) < 1


@pytest.mark.parametrize("name", ["tiny_v1", "tiny_v1_wide"])
def test_threshold_below_every_confidence_commits_the_first_argmax(name):
    """τ → 0: every slot is committed by the first (full, exact) forward: the reference's first argmax."""
    t = fixture_tensors(name)
    slots = np.flatnonzero(t["input_ids_after_replay"][0] == fixture_oracle(name)["generation"]["mask_id"])
    want = np.argmax(t["first_logits"][0, slots], -1).reshape(3, -1)
    for cache in ("none", "prefix"):
        result, tokens = _run(name, unmask="threshold:1e-9", cache=cache)
        assert result["forwards"] == 1
        np.testing.assert_array_equal(tokens, want)


def test_threshold_near_one_commits_one_slot_per_caption_per_step():
    result, _ = _run("tiny_v1", unmask="threshold:0.999999")  # a random model is never that confident
    assert result["forwards"] == 8 and result["tokens_per_forward"] == 3  # G = 8 forwards, 3 regions


def _threshold(logits, valid, tau, block):
    fn = jax.jit(functools.partial(sampling.denoise_threshold, lambda tok, s: logits[s], block_size=block,
                                   sampler=sampling.Sampler(mask_id=99)))
    return fn(jnp.asarray(valid), jnp.float32(tau))


def test_threshold_sampler_commit_rules():
    # Two caption blocks of 3 slots, vocabulary 5, τ = 0.9; a logit of 20 means p ≈ 1, all-zero rows p = 0.2.
    step0 = np.zeros((1, 6, 5), np.float32)
    step0[0, 0, 1] = 20.0  # above τ: committed
    step0[0, 4, 2] = 1.0  # p ≈ 0.4: below τ, but the most confident of block 1, which has none above τ
    step1 = np.zeros((1, 6, 5), np.float32)
    step1[0, [1, 3, 5], 3] = 20.0  # above τ: committed; slot 2 stays uniform and masked
    step2 = np.zeros((1, 6, 5), np.float32)
    step2[0, :, 4] = 20.0  # only slot 2 is still masked
    logits = jnp.asarray(np.stack([step0, step1, step2]))
    tokens, forwards = _threshold(logits, np.ones((1, 6), bool), 0.9, 3)
    np.testing.assert_array_equal(np.asarray(tokens), [[1, 3, 4, 3, 2, 3]])
    assert int(forwards) == 3


def test_threshold_sampler_skips_padding_and_stops_at_block_size():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 1, 8, 7)).astype(np.float32))
    valid = np.array([[True] * 4 + [False] * 4])
    tokens, forwards = _threshold(logits, valid, 0.99, 4)  # low confidences: one slot per block per step
    assert int(forwards) == 4
    assert np.all(np.asarray(tokens)[0, 4:] == 0) and not np.any(np.asarray(tokens)[0, :4] == 99)


@pytest.mark.parametrize("cache, unmask, message", [
    ("prefix:0", "remask", "refresh period"),
    ("lru", "remask", "cache mode"),
    ("none", "threshold:1.5", "threshold"),
    ("none", "threshold:x", "cannot parse"),
    ("none", "topk", "unmask mode"),
])
def test_bad_mode_strings(cache, unmask, message):
    with pytest.raises(PDLMError, match=message):
        Mode.parse(cache, unmask)


def test_mode_names():
    assert Mode.parse().name == "exact" and Mode.parse().exact
    assert Mode.parse("prefix:4", "threshold:0.5").name == "prefix:4+threshold:0.5"


@pytest.mark.parametrize("name, split", [("exact", (7, 0)), ("prefix", (1, 6)), ("prefix:3", (3, 4)),
                                         ("threshold:0.5", (7, 0)), ("prefix:2+threshold:0.75", (4, 3))])
def test_one_mode_description(name, split):
    """A mode's name, its CLI spellings and its bucket are one description: they round-trip, and a bucket keeps
    only what its compiled program depends on (refresh and threshold are runtime inputs)."""
    from infer.bench import parse_mode
    from pdlm_jax.pipeline import choose_bucket

    mode = Mode.from_name(name)
    assert mode.name == name and Mode.parse(**mode.arguments) == mode and parse_mode(name) == mode
    bucket = choose_bucket(7, 2, 100, 6, GenerationSettings(gen_length=8, steps=8, mode=mode))
    assert (bucket.prefix, bucket.threshold) == (mode.cache == "prefix", mode.unmask == "threshold")
    assert bucket == choose_bucket(7, 2, 100, 6, GenerationSettings(gen_length=8, steps=8,
                                                                    mode=Mode(mode.cache, None, mode.unmask)))
    assert mode.forward_split(7) == split  # steps 0, R, 2R, ... are full forwards
    assert Mode.from_name("threshold") == Mode(unmask="threshold", threshold=0.9)
    with pytest.raises(PDLMError, match=r"'prefix\+prefix' is not a sampler mode"):
        Mode.from_name("prefix+prefix")
    with pytest.raises(PDLMError, match=r"--modes 'fast': 'fast' is not a sampler mode: .* \(or sequential\)"):
        parse_mode("fast")


def test_threshold_history_shows_each_commit():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 1, 8, 7)).astype(np.float32))
    fn = jax.jit(functools.partial(sampling.denoise_threshold, lambda tok, s: logits[s], block_size=4,
                                   sampler=sampling.Sampler(mask_id=99, history=True)))
    tokens, forwards, history = fn(jnp.ones((1, 8), bool), jnp.float32(0.99))
    history = np.asarray(history)[: int(forwards)]
    np.testing.assert_array_equal(history[-1], np.asarray(tokens))
    # Low confidences: one slot per block of 4 is committed per step, and committed slots never change.
    assert (history[:, 0] == 99).sum(-1).tolist() == [6, 4, 2, 0]
    for s in range(1, len(history)):
        kept = history[s - 1] != 99
        np.testing.assert_array_equal(history[s][kept], history[s - 1][kept])
