"""Rotary position embedding, rotate-half convention (SPEC §4.4.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, *, float32: bool = True) -> np.ndarray:
    """inv_freq[j] = 1 / theta^(2j / head_dim) in float32, bit-equal to the reference's torch buffer.

    Computed on the host with numpy float32 (a constant): under jit XLA constant-folds `pow` with a
    different rounding, which moves the phases at long positions by ~1e-4.
    `float32=False` reproduces training, where `model.to(bfloat16)` rounds the buffer (SPEC §4, quirk
    `rope_inv_freq_float32`); the frequencies are then used in float32 again.
    """
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if not float32:
        inv_freq = inv_freq.astype(ml_dtypes.bfloat16).astype(np.float32)
    return inv_freq


def rope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, dtype, *, float32_inv_freq: bool = True
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape positions.shape + (head_dim,), computed in float32 then cast to `dtype`.

    positions: (L,) or (B, L) integer positions.
    """
    inv_freq = inverse_frequencies(head_dim, theta, float32=float32_inv_freq)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, L, heads, head_dim); cos/sin: (L, head_dim) or (B, L, head_dim)."""
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return x * cos + rotate_half(x) * sin
