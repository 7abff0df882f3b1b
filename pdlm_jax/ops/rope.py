"""Rotary position embedding, rotate-half convention (SPEC §4.4.2)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, *, float32: bool = True) -> np.ndarray:
    """inv_freq[j] = 1 / theta^(2j / head_dim) in float32, the reference's torch buffer (SPEC §4.4.2).

    The reference rounds three times in float32: the exponent 2j/head_dim, theta^exponent, the reciprocal.
    Division is correctly rounded everywhere; `pow` is not: numpy's float32 `pow` takes a different SIMD
    path (and last bit) on AVX-512 CPUs. So the power is computed in float64 with scalar `math.pow` and
    rounded once to float32, which gives the correctly rounded float32 power on any CPU (see
    `tests/test_llada_oracle.py`: every float64 result lies far from a float32 rounding boundary). It equals
    the torch buffer for the head sizes we use (16, 64, 128 at theta 5e5, tested); torch's own vectorised
    `pow` is not correctly rounded everywhere (1 ulp off in one entry for head_dim 72 or 96).
    Computed on the host (a constant): under jit XLA constant-folds `pow` with a different rounding, which
    moves the phases at long positions by ~1e-4.
    `float32=False` reproduces training, where `model.to(bfloat16)` rounds the buffer (SPEC §4, quirk
    `rope_inv_freq_float32`); the frequencies are then used in float32 again.
    """
    inv_freq = np.float32(1.0) / power_float32(theta, rope_exponents(head_dim))
    if not float32:
        inv_freq = inv_freq.astype(ml_dtypes.bfloat16).astype(np.float32)
    return inv_freq


def rope_exponents(head_dim: int) -> np.ndarray:
    """2j / head_dim in float32, as the reference computes them (a correctly rounded division)."""
    return np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)


def power_float32(base: float, exponents: np.ndarray) -> np.ndarray:
    """float32(base ** e) for each float32 e, via float64 scalar math: no CPU-dependent SIMD rounding."""
    return np.array([math.pow(float(np.float32(base)), float(e)) for e in exponents], np.float64).astype(np.float32)


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
