"""Pallas splash attention (the TPU kernel, pdlm_jax.ops.attention) against our XLA attention, run in Pallas'
interpret mode on the CPU: the structured region mask of a batch of two layouts, random float32 inputs,
forward and gradients equal within 1e-5 (float32 accumulation in both; the kernel works blockwise)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdlm_jax.errors import PDLMError
from pdlm_jax.ops.attention import dot_product_attention
from pdlm_jax.ops.structured_mask import allowed_mask

B, L, H, D = 2, 256, 2, 32  # two kv blocks of 128: blocks fully masked, partly masked and fully visible


def region_mask():
    """Two prompt layouts: a fix prompt, 3 caption blocks each seeing its own RoI span, right padding."""
    block, roi = np.full((B, L), -1), np.full((B, L), -2)
    prefix, valid = np.zeros((B, L), bool), np.ones((B, L), bool)
    for b in range(B):
        prefix[b, :100 + 8 * b] = True
        for r in range(3):
            block[b, 120 + 30 * r: 140 + 30 * r] = r
            roi[b, 20 + 10 * r: 30 + 10 * r] = r
        valid[b, 230 + 10 * b:] = False
    return jax.vmap(allowed_mask)(*map(jnp.asarray, (block, roi, prefix, valid)))[:, None]


def test_splash_equals_xla_attention_with_the_region_mask():
    q, k, v = (jax.random.normal(key, (B, L, H, D), jnp.float32) for key in jax.random.split(jax.random.key(0), 3))
    mask = region_mask()

    def attend(implementation):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, mask, implementation=implementation)
            return jnp.sum(out * jnp.cos(out)), out  # a loss whose gradient reaches every output
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    out, grads = attend("xla")
    splash_out, splash_grads = attend("splash-interpret")
    np.testing.assert_allclose(splash_out, out, atol=1e-5)
    for g, sg in zip(grads, splash_grads):
        np.testing.assert_allclose(sg, g, atol=1e-5)


def test_splash_needs_block_multiples():
    x = jnp.zeros((1, 100, H, D))
    with pytest.raises(PDLMError, match="divisible by 128"):
        dot_product_attention(x, x, x, None, implementation="splash-interpret")
