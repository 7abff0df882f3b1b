"""LLaDA's semi-autoregressive block sampler, as PerceptionDLM-Base runs it (SPEC-base §B5).

`generate_with_embeds` in the reference (temperature 0, cfg 0, `low_confidence`): the answer is a canvas of
G mask tokens after the prompt, decoded in nb = G / B blocks of B positions, s = S / nb steps per block. Each
step asks `logits_fn` for the float32 logits at the current block's positions, bans five ids at masked rows,
takes the argmax and commits, for good, the `k_i` most confident masked positions of the block (no
re-masking). The transfer counts `k_i` spread B over the s steps, the remainder going to the earliest steps.
A block is left as soon as it has no mask (the reference's early exit), so a run has nb · min(s, B) forwards;
they all run inside one `lax.fori_loop`.

As in the region sampler (`sampling.py`), confidences are ranked in float32 by log-probability with the
float64 rounding of the softmax denominator emulated, and ties go to the lowest position (the reference's
`topk` leaves them unspecified).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pdlm_jax.errors import PDLMError
from pdlm_jax.sampling import confidence

# Hard-coded in the reference (LLaDA's <|endoftext|>, <|startoftext|>, <|start_header_id|>,
# <|end_header_id|>); banned by number, and only where they exist in the vocabulary (SPEC-base §B5.4.4).
BANNED_IDS = (126081, 126080, 126346, 126347)

# logits_fn(tokens (Bt, G) int32, block int32, step int32, carry) -> (logits (Bt, B, V) float32 at the rows of
# the block, carry)
BlockLogitsFn = Callable[[jax.Array, jax.Array, jax.Array, object], tuple[jax.Array, object]]


def transfer_counts(masked: int, steps: int) -> list[int]:
    """`get_num_transfer_tokens`: tokens committed at each of `steps` steps, remainder to the earliest ones."""
    return [masked // steps + (1 if i < masked % steps else 0) for i in range(steps)]


def block_schedule(gen_length: int, block_length: int, steps: int) -> tuple[int, list[int]]:
    """(number of blocks, the transfer counts of the forwards each block runs).

    The reference asserts G % B == 0 and S % nb == 0; we raise PDLMError instead. Zero counts are dropped:
    the reference leaves a block without a forward once it has no mask (s > B).
    """
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise PDLMError(f"{name} must be a positive integer, got {value!r}")
    if gen_length % block_length:
        raise PDLMError(f"gen_length={gen_length} must be a multiple of block_length={block_length} "
                        "(the answer is decoded in whole blocks)")
    blocks = gen_length // block_length
    if steps % blocks:
        raise PDLMError(f"steps={steps} must be a multiple of the number of blocks gen_length/block_length="
                        f"{blocks} (each block gets steps/blocks steps)")
    return blocks, [k for k in transfer_counts(block_length, steps // blocks) if k]


def banned_ids(vocab_size: int, mask_id: int) -> np.ndarray:
    """The ids banned at masked rows that exist in a vocabulary of `vocab_size` (the mask id always)."""
    return np.array(sorted({i for i in BANNED_IDS if i < vocab_size} | {mask_id}), np.int32)


def denoise_blocks(logits_fn: BlockLogitsFn, batch: int, gen_length: int, block_length: int,
                   counts: list[int], *, mask_id: int, banned: np.ndarray, carry=None
                   ) -> tuple[jax.Array, jax.Array]:
    """Run the block sampler; returns (answer tokens (Bt, G) int32, the tokens after every forward (F, Bt, G)).

    `counts` (static) comes from `block_schedule`; F = blocks · len(counts). `carry` is threaded through
    `logits_fn` (the embeddings, a K/V cache, ...). Traceable: call it inside a jit.
    """
    steps, B = len(counts), block_length
    forwards = gen_length // B * steps
    counts = jnp.asarray(counts, jnp.int32)

    def step(t, state):
        tokens, history, carry = state
        block, i = t // steps, t % steps
        logits, carry = logits_fn(tokens, block, i, carry)
        logits = logits.astype(jnp.float32).at[..., banned].set(-jnp.inf)  # x0 of decided rows is discarded
        x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # ties -> lowest id, like torch.argmax
        conf = confidence(logits, x0)
        current = jax.lax.dynamic_slice_in_dim(tokens, block * B, B, axis=1)
        masked = current == mask_id
        order = jnp.argsort(jnp.where(masked, -conf, jnp.inf), axis=-1, stable=True)  # most confident first
        commit = masked & (jnp.argsort(order, axis=-1) < counts[i])
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, jnp.where(commit, x0, current), block * B, axis=1)
        return tokens, history.at[t].set(tokens), carry

    tokens = jnp.full((batch, gen_length), mask_id, jnp.int32)
    history = jnp.zeros((forwards, batch, gen_length), jnp.int32)
    tokens, history, _ = jax.lax.fori_loop(0, forwards, step, (tokens, history, carry))
    return tokens, history


def denoise_blocks_threshold(logits_fn: BlockLogitsFn, batch: int, gen_length: int, block_length: int,
                             threshold: jax.Array | float, *, mask_id: int, banned: np.ndarray, carry=None
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Confidence-threshold parallel decoding of the blocks (Fast-dLLM); returns (answer tokens (Bt, G), the
    tokens after every forward (G, Bt, G), the forwards run).

    Not the reference's sampler: each forward commits, for good, every masked position of the current block
    whose p(x0) exceeds `threshold`, and at least its most confident one, so a block takes at most B forwards;
    the next block starts (step 0 again) once no row has a mask left in this one. `logits_fn` and `carry` as in
    `denoise_blocks`.
    """
    B, blocks = block_length, gen_length // block_length
    log_threshold = jnp.log(jnp.asarray(threshold, jnp.float32))

    def step(state):
        t, block, i, tokens, history, carry = state
        logits, carry = logits_fn(tokens, block, i, carry)
        logits = logits.astype(jnp.float32).at[..., banned].set(-jnp.inf)
        x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        current = jax.lax.dynamic_slice_in_dim(tokens, block * B, B, axis=1)
        masked = current == mask_id
        conf = jnp.where(masked, confidence(logits, x0), -jnp.inf)
        best = jax.nn.one_hot(jnp.argmax(conf, axis=-1), B, dtype=bool)  # ties -> lowest position
        commit = masked & ((conf > log_threshold) | best)
        current = jnp.where(commit, x0, current)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, current, block * B, axis=1)
        done = ~jnp.any(current == mask_id)
        return (t + 1, jnp.where(done, block + 1, block), jnp.where(done, 0, i + 1), tokens, history.at[t].set(tokens),
                carry)

    tokens = jnp.full((batch, gen_length), mask_id, jnp.int32)
    history = jnp.zeros((gen_length, batch, gen_length), jnp.int32)
    zero = jnp.int32(0)
    forwards, _, _, tokens, history, _ = jax.lax.while_loop(lambda s: s[1] < blocks, step,
                                                            (zero, zero, zero, tokens, history, carry))
    return tokens, history, forwards
