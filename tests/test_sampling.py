"""The sampler against the reference's own per-step logits (fixture replay), its schedule and tie rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixture_oracle, fixture_tensors
from pdlm_jax import sampling

REPLAY_FIXTURES = ("tiny_v1", "tiny_v1_roi4", "tiny_v1_wide")  # demo512 stores no step_logits


def _run(logits_fn, valid, rows, max_steps, **kw):
    counts, forwards = sampling.schedule_array(rows, max_steps)
    fn = jax.jit(functools.partial(sampling.denoise, logits_fn, sampler=sampling.Sampler(**kw)))
    return fn(jnp.asarray(valid), jnp.asarray(counts), jnp.int32(forwards))


@pytest.mark.parametrize("name", REPLAY_FIXTURES)
def test_replaying_reference_logits_reproduces_output_ids(name):
    oracle, t = fixture_oracle(name), fixture_tensors(name)
    gen = oracle["generation"]
    mask_id, steps = gen["mask_id"], gen["steps"]
    ids = t["input_ids_after_replay"][0]
    slots = np.flatnonzero(ids == mask_id)
    assert len(slots) == 3 * gen["gen_length_per_mask"]
    step_logits = jnp.asarray(t["step_logits"][:, 0][:, slots])  # (S, N, V) at the slots only
    seen = []

    def logits_fn(tokens, s):
        jax.debug.callback(lambda s, tok: seen.append((int(s), np.asarray(tok[0]) == mask_id)), s, tokens)
        return step_logits[s][None]

    tokens, forwards = _run(logits_fn, np.ones((1, len(slots)), bool), [(len(slots), steps)], steps,
                            mask_id=mask_id)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(tokens[0]), t["output_ids"][0][slots])
    assert int(forwards) == gen["num_forwards"] == steps
    # The masked slots fed to every forward match the reference's.
    assert [s for s, _ in seen] == list(range(steps))
    for s, masked in seen:
        np.testing.assert_array_equal(masked, t["step_mask_positions"][s, 0][slots], err_msg=f"step {s}")


def test_schedule_uses_python_float_semantics():
    # 90 * (7/10) = 62.99999999999999 in float64: the reference re-masks 62, not 63, after step 2.
    assert sampling.remask_counts(90, 10) == [81, 72, 62, 54, 45, 36, 27, 18, 9, 0]
    assert sampling.remask_counts(24, 8) == [21, 18, 15, 12, 9, 6, 3, 0]
    # 49 * (1/49) = 0.9999999999999999: the reference stops early after 48 forwards.
    counts = sampling.remask_counts(49, 49)
    assert len(counts) == 48 and counts[-1] == 0 and 0 not in counts[:-1]
    assert sampling.remask_counts(5, 1) == [0]


def test_schedule_array_pads_rows_of_different_lengths():
    counts, forwards = sampling.schedule_array([(6, 3), (4, 2)], 5)
    assert forwards == 3
    np.testing.assert_array_equal(counts, [[4, 2, 0, 0, 0], [2, 0, 0, 0, 0]])
    with pytest.raises(ValueError):
        sampling.schedule_array([(6, 6)], 5)


def test_remask_ties_go_to_lowest_position_and_skip_padding():
    conf = jnp.array([[0.5, 0.1, 0.1, 0.1, -9.0]])
    valid = jnp.array([[True, True, True, True, False]])
    chosen = sampling._remask(conf, valid, jnp.array([2]))
    np.testing.assert_array_equal(np.asarray(chosen), [[False, True, True, False, False]])


def test_confidence_keeps_float64_ties_and_order():
    # Slot 0: margin 50 -> p == 1.0 in float64; slot 1: margin 60 -> also exactly 1.0: a float64 tie.
    # Slot 2: margin 20 -> p = 1 - 2e-9 < 1.0 in float64 (but 1.0 in a float32 softmax).
    logits = jnp.array([[[50.0, 0.0, 0.0], [60.0, 0.0, 0.0], [20.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    conf = np.asarray(sampling.confidence(logits, jnp.argmax(logits, -1)))[0]
    p64 = np.exp(-np.log1p(2 * np.exp(-np.array([50.0, 60.0, 20.0, 1.0]))))
    assert p64[0] == p64[1] == 1.0 and p64[2] < 1.0
    assert conf[0] == conf[1] == 0.0
    assert conf[3] < conf[2] < conf[0]
    np.testing.assert_allclose(np.exp(conf[3]), p64[3], rtol=1e-6)


def test_argmax_ties_pick_lowest_id_and_commits_only_masked_slots():
    # One step with 3 slots: argmax ties between ids 1 and 2 -> 1.
    logits = jnp.array([[[0.0, 5.0, 5.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    tokens, _ = _run(lambda tok, s: logits, np.ones((1, 3), bool), [(3, 1)], 1, mask_id=7)
    np.testing.assert_array_equal(np.asarray(tokens), [[1, 0, 2]])


def test_padded_slots_never_participate():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 1, 6, 11)).astype(np.float32))
    valid = np.array([[True] * 4 + [False] * 2])
    padded, _ = _run(lambda tok, s: logits[s], valid, [(4, 4)], 4, mask_id=10)
    alone, _ = _run(lambda tok, s: logits[s, :, :4], np.ones((1, 4), bool), [(4, 4)], 4, mask_id=10)
    np.testing.assert_array_equal(np.asarray(padded[:, :4]), np.asarray(alone))
    assert np.all(np.asarray(padded[:, 4:]) == 0)


def test_rows_with_different_schedules_share_one_program():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(5, 2, 6, 13)).astype(np.float32))
    valid = np.array([[True] * 6, [True] * 4 + [False] * 2])
    both, forwards = _run(lambda tok, s: logits[s], valid, [(6, 5), (4, 3)], 5, mask_id=12)
    first, _ = _run(lambda tok, s: logits[s, :1], valid[:1], [(6, 5)], 5, mask_id=12)
    second, f2 = _run(lambda tok, s: logits[s, 1:, :4], valid[1:, :4], [(4, 3)], 3, mask_id=12)
    assert int(forwards) == 5 and int(f2) == 3
    np.testing.assert_array_equal(np.asarray(both[0]), np.asarray(first[0]))
    np.testing.assert_array_equal(np.asarray(both[1, :4]), np.asarray(second[0]))


def test_sampling_is_seeded_and_nucleus_keeps_only_the_top_token():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 1, 8, 50)).astype(np.float32))
    valid = np.ones((1, 8), bool)
    run = functools.partial(_run, lambda tok, s: logits[s], valid, [(8, 4)], 4, mask_id=49, temperature=1.0,
                            sample=True)
    a, _ = run(key=jax.random.key(0))
    b, _ = run(key=jax.random.key(0))
    c, _ = run(key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # A tiny nucleus keeps only the most probable token: sampling then equals greedy decoding.
    nuc, _ = run(key=jax.random.key(1), top_p=1e-6, nucleus=True)
    greedy, _ = _run(lambda tok, s: logits[s], valid, [(8, 4)], 4, mask_id=49)
    np.testing.assert_array_equal(np.asarray(nuc), np.asarray(greedy))


def test_nucleus_mass():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(sampling._nucleus(logits, jnp.float32(1.0), jnp.float32(0.7))))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(np.asarray(sampling._nucleus(logits, jnp.float32(1.0), jnp.float32(0.81))))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_history_records_the_tokens_after_every_step():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(5, 2, 6, 9)).astype(np.float32))
    valid = np.ones((2, 6), bool)
    valid[1, 4:] = False
    plain = _run(lambda tok, s: logits[s], valid, [(6, 5), (4, 3)], 5, mask_id=99)
    tokens, forwards, history = _run(lambda tok, s: logits[s], valid, [(6, 5), (4, 3)], 5, mask_id=99, history=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(plain[0]))
    history = np.asarray(history)
    assert history.shape == (5, 2, 6) and int(forwards) == 5
    np.testing.assert_array_equal(history[-1], np.asarray(tokens))
    # Row 0 re-masks 4, 3, 2, 1, 0 of its 6 slots after each step; row 1 (3 steps) stays final afterwards.
    assert (history[:, 0] == 99).sum(-1).tolist() == [4, 3, 2, 1, 0]
    assert (history[:, 1, :4] == 99).sum(-1).tolist() == [2, 1, 0, 0, 0]
    # Decided tokens are those of the final output wherever a slot is no longer masked at the last steps.
    np.testing.assert_array_equal(history[2, 1], np.asarray(tokens)[1])
