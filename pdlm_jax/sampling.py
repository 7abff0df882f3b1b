"""The parallel masked-diffusion sampler of the reference (SPEC §9.1, quirks §14.6–8), and a faster
confidence-threshold sampler (`denoise_threshold`, opt-in, not the reference's).

`generate_with_embeds_nonblock` in the reference, restated on the generation slots only: the state is the
N = k·G slot tokens (the mask id where a slot is currently masked) plus the set of currently masked slots.
Each step asks `logits_fn` for the float32 logits at the slots, commits the argmax into the currently masked
slots, then re-masks the `n_s` least confident slots among ALL originally masked ones. The schedule
`n_s = int(N·((S−1−s)/S))` is computed on the host with Python floats (as the reference does) and passed in
as an int array, so rows with different N or S can share one compiled program.

Differences from the reference, on purpose:
- ties in the re-masking order go to the lowest slot position (the reference's `topk` leaves them unspecified);
- confidences are ranked in float32 by log-probability, with the float64 rounding of the softmax denominator
  emulated so that probabilities that are exactly 1.0 in float64 tie here too (see `confidence`);
- `top_p` nucleus filtering is implemented for temperature > 0 (the reference accepts `top_p` and ignores it);
- temperature > 0 uses Gumbel noise from `jax.random`, so sampled outputs are not comparable with PyTorch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# logits_fn(slot_tokens (B, N) int32, step int32 scalar) -> logits (B, N, V) float32 at the slots
# (or, with a carry, (tokens, step, carry) -> (logits, carry)).
LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]

_F64_EPS = 2.0**-52  # spacing of float64 just above 1.0


def remask_counts(num_masked: int, steps: int) -> list[int]:
    """Slots re-masked after each forward, in the reference's float semantics; its length = forwards run.

    The reference stops after step S−1 and as soon as a count is 0, so the list ends with its only 0.
    Example: N=90, S=10 gives 81, 72, 62 (not 63: 90·(7/10) = 62.99999999999999 in float64), ...
    """
    counts = []
    for s in range(steps):
        n = 0 if s == steps - 1 else int(num_masked * ((steps - 1 - s) / steps))
        counts.append(n)
        if n == 0:
            break
    return counts


def schedule_array(rows: list[tuple[int, int]], max_steps: int) -> tuple[np.ndarray, int]:
    """Per-row re-mask counts (B, max_steps) int32, zero-padded, and the number of forwards to run.

    `rows` holds (N, S) per batch row. The program runs max(forwards) steps; a row that finished earlier
    has no masked slot left and a zero count, so the extra steps leave it unchanged.
    """
    counts = np.zeros((len(rows), max_steps), np.int32)
    forwards = 0
    for b, (n, s) in enumerate(rows):
        c = remask_counts(n, s)
        if len(c) > max_steps:
            raise ValueError(f"schedule of {len(c)} steps does not fit max_steps={max_steps}")
        counts[b, : len(c)] = c
        forwards = max(forwards, len(c))
    return counts, forwards


def confidence(logits: jax.Array, x0: jax.Array) -> jax.Array:
    """log p(x0) under softmax(logits), ranked like the reference's float64 softmax.

    p(x0) = exp(z0 − m) / (1 + s) with m = max z and s = Σ_{v ≠ argmax} exp(z_v − m). In float32 a plain
    softmax rounds p to 1.0 once the margin exceeds ~17 and makes many slots tie; float64 does so only below
    s ≈ 1e-16. We keep s separate (log1p) and round it to float64's 2^-52 grid, which reproduces exactly
    the float64 ties and otherwise orders like the reference up to float32 precision.
    """
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    top = jnp.argmax(logits, axis=-1)
    is_top = jnp.arange(logits.shape[-1]) == top[..., None]
    s = jnp.sum(jnp.where(is_top, 0.0, e), axis=-1)
    s = jnp.round(s / _F64_EPS) * _F64_EPS  # a no-op once s is large enough for float32 to be coarser
    z0 = jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
    return (z0 - m[..., 0]) - jnp.log1p(s)


def _nucleus(logits: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with tokens outside the top-p nucleus of softmax(logits / T) set to −inf.

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p (at least one token);
    tokens tied with the least probable member are kept too.
    """
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    sorted_p = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
    kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_p, kept - 1, axis=-1)
    return jnp.where(probs >= cutoff, logits, -jnp.inf)


def _remask(conf: jax.Array, valid: jax.Array, count: jax.Array) -> jax.Array:
    """(B, N) bool: the `count` least confident valid slots per row, ties to the lowest position."""
    key = jnp.where(valid, conf, jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # inverse permutation: rank of each slot in the order
    return rank < count[:, None]


def _keys_per_row(key: jax.Array | None, rows: int) -> jax.Array | None:
    """One PRNG key per batch row: a (B,) key array is used as is, a single key serves every row."""
    if key is None or key.ndim:
        return key
    return jnp.stack([key] * rows)


def _propose(logits: jax.Array, step: jax.Array, keys: jax.Array | None, temperature: jax.Array,
             top_p: jax.Array, sample: bool, nucleus: bool) -> tuple[jax.Array, jax.Array]:
    """Candidate tokens x0 (B, N) int32 and their confidence log p(x0) under the un-noised logits."""
    if sample:
        pick = _nucleus(logits, temperature, top_p) if nucleus else logits
        gumbel = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step), logits.shape[1:], jnp.float32))
        x0 = jnp.argmax(pick + temperature * gumbel(keys), axis=-1)
    else:
        x0 = jnp.argmax(logits, axis=-1)  # ties -> lowest id, like torch.argmax
    x0 = x0.astype(jnp.int32)
    return x0, confidence(logits, x0)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The settings both samplers share: how each step proposes tokens, and what the loop records.

    temperature / top_p may be traced values; greedy decoding (sample=False) ignores them and `key` (one
    PRNG key, or one per row). `sample` (temperature > 0), `nucleus` (top_p < 1) and `history` (record the
    slot tokens after every step) are static switches: each selects another program.
    """

    mask_id: int
    temperature: jax.Array | float = 0.0
    top_p: jax.Array | float = 1.0
    key: jax.Array | None = None
    sample: bool = False
    nucleus: bool = False
    history: bool = False


def _start(logits_fn: Callable, slot_valid: jax.Array, sampler: Sampler, carry) -> tuple[jax.Array, Callable]:
    """The start tokens (every valid slot masked) and `propose(tokens, step, carry) -> (x0, log p(x0), carry)`,
    whether or not `logits_fn` takes a carry."""
    tokens = jnp.where(slot_valid, sampler.mask_id, 0).astype(jnp.int32)
    temperature = jnp.asarray(sampler.temperature, jnp.float32)
    top_p = jnp.asarray(sampler.top_p, jnp.float32)
    keys = _keys_per_row(sampler.key, tokens.shape[0])
    forward = logits_fn if carry is not None else (lambda t, s, c: (logits_fn(t, s), c))

    def propose(tokens, step, carry):
        logits, carry = forward(tokens, step, carry)
        return (*_propose(logits.astype(jnp.float32), step, keys, temperature, top_p, sampler.sample,
                          sampler.nucleus), carry)

    return tokens, propose


def _history_buffer(sampler: Sampler, max_steps: int, tokens: jax.Array) -> jax.Array | None:
    """The preallocated (max_steps, B, N) record of the slot tokens after each step, when asked for."""
    return jnp.zeros((max_steps, *tokens.shape), jnp.int32) if sampler.history else None


def _record(history: jax.Array | None, step: jax.Array, tokens: jax.Array) -> jax.Array | None:
    return None if history is None else history.at[step].set(tokens)


def denoise(logits_fn: LogitsFn, slot_valid: jax.Array, counts: jax.Array, num_forwards: jax.Array,
            sampler: Sampler, carry=None) -> tuple[jax.Array, ...]:
    """Run the low-confidence re-masking sampler; returns (slot tokens (B, N) int32, forwards run), and with
    `sampler.history` also the slot tokens after every step (S_max, B, N) (entries past the forwards run: 0).

    slot_valid (B, N) bool marks real generation slots (False = padding, never masked, never chosen);
    counts (B, S_max) int32 comes from `schedule_array`; num_forwards is its forward count (may be traced).
    With `carry` (model state that changes across steps, e.g. a K/V cache) `logits_fn(tokens, step, carry)`
    returns (logits, carry). Traceable: call it inside a jit.
    """
    tokens, propose = _start(logits_fn, slot_valid, sampler, carry)

    def step(s, state):
        tokens, masked, carry, history = state
        x0, conf, carry = propose(tokens, s, carry)
        tokens = jnp.where(masked, x0, tokens)  # commit into currently masked slots only
        masked = _remask(conf, slot_valid, counts[:, s])
        tokens = jnp.where(masked, sampler.mask_id, tokens)
        return tokens, masked, carry, _record(history, s, tokens)

    history = _history_buffer(sampler, counts.shape[1], tokens)
    tokens, _, _, history = jax.lax.fori_loop(0, num_forwards, step, (tokens, slot_valid, carry, history))
    forwards = jnp.asarray(num_forwards, jnp.int32)
    return (tokens, forwards) if history is None else (tokens, forwards, history)


def denoise_threshold(logits_fn: LogitsFn, slot_valid: jax.Array, threshold: jax.Array | float, block_size: int,
                      sampler: Sampler, carry=None) -> tuple[jax.Array, ...]:
    """Confidence-threshold parallel decoding (Fast-dLLM); returns (slot tokens (B, N), forwards run).

    Not the reference's sampler: each forward commits, for good, every masked slot whose p(x0) exceeds
    `threshold`, and at least the most confident still-masked slot of every caption block (the N slots are
    blocks of `block_size` = G, one per region), so the loop ends after at most G forwards, when no slot is
    masked. Arguments and results as in `denoise` (the history has block_size entries).
    """
    tokens, propose = _start(logits_fn, slot_valid, sampler, carry)
    log_threshold = jnp.log(jnp.asarray(threshold, jnp.float32))
    B, N = tokens.shape

    def step(state):
        s, tokens, masked, carry, history = state
        x0, conf, carry = propose(tokens, s, carry)
        conf = jnp.where(masked, conf, -jnp.inf).reshape(B, N // block_size, block_size)
        best = jax.nn.one_hot(jnp.argmax(conf, axis=-1), block_size, dtype=bool)  # ties -> lowest position
        commit = masked & ((conf > log_threshold) | best).reshape(B, N)
        tokens = jnp.where(commit, x0, tokens)
        return s + 1, tokens, masked & ~commit, carry, _record(history, s, tokens)

    def running(state):
        s, _, masked, _, _ = state
        return (s < block_size) & jnp.any(masked)

    history = _history_buffer(sampler, block_size, tokens)
    forwards, tokens, _, _, history = jax.lax.while_loop(running, step,
                                                         (jnp.int32(0), tokens, slot_valid, carry, history))
    return (tokens, forwards) if history is None else (tokens, forwards, history)
