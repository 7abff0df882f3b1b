"""Multi-head dot-product attention with the reference's precision (SPEC §3.2.3, §4.4.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdlm_jax.errors import PDLMError


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Attention over q/k/v of shape (B, L, heads, head_dim); returns (B, Lq, heads, head_dim).

    mask: boolean (True = attend) or additive float, broadcastable to (B, heads, Lq, Lk).
    scale: defaults to head_dim ** -0.5.
    implementation: "xla" reproduces the eager reference: scores in the compute dtype, scaled and
      masked, softmax in float32, probabilities cast back to the compute dtype before the value product.
      "cudnn" uses the fused GPU kernel of `jax.nn.dot_product_attention` (different rounding).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation == "cudnn":
        return _fused(q, k, v, mask, scale, "cudnn")
    if implementation != "xla":
        raise PDLMError(f"unknown attention implementation {implementation!r}; use 'xla' or 'cudnn'")

    dtype = q.dtype
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    # The scale is applied as one op rounded to the compute dtype, as in the reference.
    scores = (scores.astype(jnp.float32) * scale).astype(dtype).astype(jnp.float32)
    if mask is not None:
        if mask.dtype == jnp.bool_:
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        else:
            scores = scores + mask.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _fused(q, k, v, mask, scale, implementation):
    """`jax.nn.dot_product_attention` with our mask convention (bool -> mask, float -> additive bias)."""
    is_bool = mask is not None and mask.dtype == jnp.bool_
    return jax.nn.dot_product_attention(
        q, k, v,
        bias=None if mask is None or is_bool else mask.astype(q.dtype),
        mask=mask if is_bool else None,
        scale=scale,
        implementation=implementation,
    )
