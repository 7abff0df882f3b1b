"""The masked-diffusion training objective of LLaDA / PerceptionDLM (SPEC §11.1, standard mode).

Per sample b: t_b ~ U[0, 1), p_b = (1 − ε)·t_b + ε; each answer token (label ≠ −100) is replaced by the
`<|mdm_mask|>` embedding with probability p_b; the loss is Σ over masked positions of CE / p_b, divided
by the sample's answer length A_b, averaged over the batch. Noise comes from `jax.random`. Optionally
t_b ~ U[t_min, 1): no low-noise draws, whose large 1/p_b weights make small-batch gradients noisy.

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


def draw_noise(key: jax.Array, shape: tuple[int, int], t_min: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """t (B,) ~ U[t_min, 1) and the per-position uniforms u (B, L) that decide which answer tokens are masked."""
    kt, ku = jax.random.split(key)
    return jax.random.uniform(kt, shape[:1], minval=t_min), jax.random.uniform(ku, shape)


def mask_probability(t: jax.Array) -> jax.Array:
    return (1.0 - EPS) * t + EPS


def noise_embeddings(embeds: jax.Array, labels: jax.Array, t: jax.Array, u: jax.Array,
                     mask_embedding: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedding-space masking: (noisy embeds (B, L, H), masked (B, L) bool as the reference recovers it).

    The reference re-derives the masked set from the noisy embeddings (rows equal to the mask embedding
    within 1e-5 + 1e-5·|m| on every dim, §11.1.5); we do the same, so a clean `<|mdm_mask|>` token would
    count too.
    """
    chosen = (u < mask_probability(t)[:, None]) & (labels != IGNORE)
    m = mask_embedding.astype(embeds.dtype)
    noisy = jnp.where(chosen[..., None], m, embeds)
    close = jnp.abs(noisy.astype(jnp.float32) - m.astype(jnp.float32)) <= 1e-5 + 1e-5 * jnp.abs(m.astype(jnp.float32))
    return noisy, jnp.all(close, axis=-1)


def answer_positions(labels: np.ndarray, size: int) -> np.ndarray:
    """(size,) int32 positions of one sample's labelled tokens, padded with len(labels) (out of range, as the
    other position inputs); `size` must be at least the number of labelled tokens."""
    rows = np.flatnonzero(labels != IGNORE).astype(np.int32)
    return np.pad(rows, (0, size - rows.size), constant_values=labels.shape[0])


def diffusion_loss(logits: jax.Array, labels: jax.Array, masked: jax.Array, t: jax.Array) -> jax.Array:
    """Scalar loss from float32 logits (B, N, V), labels (B, N), the masked set (B, N) and t (B,), where the N
    rows of each sample include all its labelled positions (all L, or the gathered answer positions)."""
    labelled = labels != IGNORE
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(labelled, labels, 0)[..., None], axis=-1)[..., 0]
    per_token = jnp.where(masked & labelled, ce, 0.0) / mask_probability(t)[:, None]
    answer_len = jnp.maximum(jnp.sum(labelled, axis=-1), 1)
    return jnp.mean(jnp.sum(per_token, axis=-1) / answer_len)


def lm_diffusion_loss(lm, embeds: jax.Array, labels: jax.Array, allowed: jax.Array, t: jax.Array, u: jax.Array,
                      mask_id: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Loss of the LM `lm` (pdlm_jax.modeling.llada.LLaDA) on clean embeddings (B, L, H).

    allowed: (B, L, L) bool structured mask (SPEC §8), built from the clean ids. positions: (B, A) every
    labelled position of each sample (`answer_positions`), padded with L; logits are computed there only.
    Returns (loss, number of masked answer tokens).
    """
    mask_embedding = lm.embed(jnp.asarray(mask_id, jnp.int32))
    noisy, masked = noise_embeddings(embeds, labels, t, u, mask_embedding)
    hidden, row_labels, row_masked = lm(noisy, allowed[:, None]), labels, masked
    # A = L: every row as it is. (A gather of all L rows compiles 1 GiB larger per chip for the 8B step on a
    # v5p-64; docs/HARDWARE.md.)
    if positions.shape[1] < labels.shape[1]:
        inside = positions < labels.shape[1]  # padding rows read row L-1 and are ignored
        row_labels = jnp.where(inside, take_rows(labels, positions), IGNORE)
        hidden, row_masked = take_rows(hidden, positions), take_rows(masked, positions)
    loss = diffusion_loss(lm.logits(hidden), row_labels, row_masked, t)  # logits (B, A, V)
    return loss, jnp.sum(masked & (labels != IGNORE))
