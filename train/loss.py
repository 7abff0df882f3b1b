"""The masked-diffusion training objective of LLaDA / PerceptionDLM (SPEC §11.1, standard mode).

Per sample b: t_b ~ U[0, 1), p_b = (1 − ε)·t_b + ε; each answer token (label ≠ −100) is replaced by the
`<|mdm_mask|>` embedding with probability p_b; the loss is Σ over masked positions of CE / p_b, divided
by the sample's answer length A_b, averaged over the batch. Noise comes from `jax.random`. Optionally
t_b ~ U[t_min, 1): no low-noise draws, whose large 1/p_b weights make small-batch gradients noisy.

A packed sample (data.synthetic_questions: one image prompt, then several questions each seeing the prompt and
itself, `train.conversations.conversation_tokens`) counts as that many samples: every answer draws its own t
and is divided by its own length, and the batch mean is over answers (`packed_layout`).

Only answer positions carry a loss, so lm_head runs on the LM's final hidden states gathered at them (the
batch's `answer_positions`, padded to a static bucket) — as inference computes logits at the generation
slots only: (B, A, V) float32 logits instead of (B, L, V), the largest activation of an 8B step otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pdlm_jax.modeling.llada import take_rows

EPS = 1e-3
IGNORE = -100


def draw_noise(key: jax.Array, shape: tuple[int, int], t_min: float = 0.0,
               segment: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """t (B,) ~ U[t_min, 1) and the per-position uniforms u (B, L) that decide which answer tokens are masked;
    with `segment` (B, L) (`packed_layout`), t (B, L): one draw per answer, at each of its positions."""
    kt, ku = jax.random.split(key)
    u = jax.random.uniform(ku, shape)
    if segment is None:
        return jax.random.uniform(kt, shape[:1], minval=t_min), u
    per_answer = jax.random.uniform(kt, shape, minval=t_min)  # answer k draws column k
    return jnp.take_along_axis(per_answer, jnp.maximum(segment, 0), axis=1), u


def packed_layout(block_id: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(segment, positions), each (B, L), of packed Base samples from their block ids (block 0 the image
    prompt, block k ≥ 1 the k-th question and answer, -1 padding): segment k - 1 for block k (-1 elsewhere),
    and the positions each block has alone, right after the prompt."""
    index = jnp.arange(block_id.shape[1])
    prompt = jnp.sum(block_id == 0, axis=1, keepdims=True)
    starts = jnp.concatenate([jnp.ones_like(block_id[:, :1], bool), block_id[:, 1:] != block_id[:, :-1]], axis=1)
    block_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    positions = jnp.where(block_id > 0, prompt + index - block_start, index)
    return jnp.where(block_id > 0, block_id - 1, -1), positions


def mask_probability(t: jax.Array) -> jax.Array:
    return (1.0 - EPS) * t + EPS


def noise_embeddings(embeds: jax.Array, labels: jax.Array, t: jax.Array, u: jax.Array,
                     mask_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedding-space masking: (noisy embeds (B, L, H), masked (B, L) bool as the reference recovers it).

    The reference re-derives the masked set from the noisy embeddings (rows equal to the mask embedding
    within 1e-5 + 1e-5·|m| on every dim, §11.1.5); we do the same, so a clean `<|mdm_mask|>` token would
    count too.
    """
    chosen = (u < _per_row(mask_probability(t))) & (labels != IGNORE)
    m = mask_embedding.astype(embeds.dtype)
    noisy = jnp.where(chosen[..., None], m, embeds)
    close = jnp.abs(noisy.astype(jnp.float32) - m.astype(jnp.float32)) <= 1e-5 + 1e-5 * jnp.abs(m.astype(jnp.float32))
    return noisy, jnp.all(close, axis=-1)


def answer_positions(labels: np.ndarray, size: int) -> np.ndarray:
    """(size,) int32 positions of one sample's labelled tokens, padded with len(labels) (out of range, as the
    other position inputs); `size` must be at least the number of labelled tokens."""
    rows = np.flatnonzero(labels != IGNORE).astype(np.int32)
    return np.pad(rows, (0, size - rows.size), constant_values=labels.shape[0])


def _per_row(p: jax.Array) -> jax.Array:
    """A per-sample (B,) value as (B, 1); a per-row (B, N) one as it is."""
    return p[:, None] if p.ndim == 1 else p


def diffusion_loss(logits: jax.Array, labels: jax.Array, masked: jax.Array, t: jax.Array,
                   segment: jax.Array | None = None) -> jax.Array:
    """Scalar loss from float32 logits (B, N, V), labels (B, N), the masked set (B, N) and t (B,), where the N
    rows of each sample include all its labelled positions (all L, or the gathered answer positions). Packed
    samples: t (B, N) and `segment` (B, N), the answer of each row: each answer is divided by its own length
    and the mean is over answers."""
    labelled = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(labelled, labels, 0)[..., None], axis=-1)[..., 0]
    per_token = jnp.where(masked & labelled, ce, 0.0) / _per_row(mask_probability(t))
    if segment is None:
        answer_len = jnp.maximum(jnp.sum(labelled, axis=-1), 1)
        return jnp.mean(jnp.sum(per_token, axis=-1) / answer_len)
    same = (segment[:, :, None] == segment[:, None, :]) & labelled[:, None, :]
    answer_len = jnp.maximum(jnp.sum(same, axis=-1), 1)  # (B, N): the length of each row's answer
    answers = jnp.sum(jnp.where(labelled, 1.0 / answer_len, 0.0))  # each answer's rows sum to 1
    return jnp.sum(per_token / answer_len) / jnp.maximum(answers, 1.0)


def lm_diffusion_loss(lm, embeds: jax.Array, labels: jax.Array, allowed: jax.Array, t: jax.Array, u: jax.Array,
                      mask_id: int, positions: jax.Array, packed: tuple[jax.Array, jax.Array] | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """Loss of the LM `lm` (pdlm_jax.modeling.llada.LLaDA) on clean embeddings (B, L, H).

    allowed: (B, L, L) bool structured mask (SPEC §8), built from the clean ids. positions: (B, A) every
    labelled position of each sample (`answer_positions`), padded with L; logits are computed there only.
    packed: `packed_layout` of packed samples (t then (B, L), `draw_noise`). Returns (loss, number of masked
    answer tokens).
    """
    mask_embedding = lm.embed(jnp.asarray(mask_id, jnp.int32))
    noisy, masked = noise_embeddings(embeds, labels, t, u, mask_embedding)
    segment, rope_positions = packed if packed is not None else (None, None)
    hidden, row_labels, row_masked = lm(noisy, allowed[:, None], rope_positions), labels, masked
    # A = L: every row as it is. (A gather of all L rows compiles 1 GiB larger per chip for the 8B step on a
    # v5p-64; docs/HARDWARE.md.)
    if positions.shape[1] < labels.shape[1]:
        inside = positions < labels.shape[1]  # padding rows read row L-1 and are ignored
        row_labels = jnp.where(inside, take_rows(labels, positions), IGNORE)
        hidden, row_masked = take_rows(hidden, positions), take_rows(masked, positions)
        if packed is not None:
            t, segment = take_rows(t, positions), take_rows(segment, positions)
    loss = diffusion_loss(lm.logits(hidden), row_labels, row_masked, t, segment)  # logits (B, A, V)
    return loss, jnp.sum(masked & (labels != IGNORE))
