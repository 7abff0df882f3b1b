"""Multi-head dot-product attention with the reference's precision (SPEC §3.2.3, §4.4.3), and fused kernels:
cuDNN's on GPU, Pallas splash attention on TPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout, with_layout_constraint

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
      "splash" uses JAX's Pallas splash attention for TPU (`splash_attention`): blockwise, never the L × L
      scores; "splash-interpret" runs the same kernel in Pallas' interpret mode (any backend, slow: tests).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation == "cudnn":
        return _fused(q, k, v, mask, scale, "cudnn")
    if implementation in ("splash", "splash-interpret"):
        return splash_attention(q, k, v, mask, scale, interpret=implementation == "splash-interpret")
    if implementation != "xla":
        raise PDLMError(f"unknown attention implementation {implementation!r}; use 'xla', 'cudnn' or 'splash'")

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
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # computed as (B, heads, head_dim, Lq)
    # Materialise it row-major before the output projection reads it as (B·Lq, heads·head_dim): fused into
    # that GEMM, the transpose leaves XLA:GPU's Triton tiling without a tile for some Lq (the H100 prefix-cached
    # captioning program, k = 6, batch 8: 204 caption rows an image)
    out = with_layout_constraint(out, Layout(major_to_minor=tuple(range(out.ndim))))
    return jax.lax.optimization_barrier(out)


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


SPLASH_BLOCK = 128  # the kernel's default q and kv block (BlockSizes.get_default)


def splash_attention(q, k, v, mask, scale: float, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU) over (B, L, heads, head_dim), with `mask` a boolean (B, 1, Lq, Lk) as
    the structured region mask: a dynamic mask (its blocks computed on device per example; blocks that
    are all masked are skipped) shared by all heads. Lq and Lk must be multiples of SPLASH_BLOCK.

    Rounding: q is scaled before the kernel (in its dtype) and scores accumulate in float32, so results
    differ from "xla" (which rounds the scaled scores to the compute dtype) by bf16 rounding."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if Lq % SPLASH_BLOCK or Lk % SPLASH_BLOCK:
        raise PDLMError(f"splash attention needs sequence lengths divisible by {SPLASH_BLOCK}, got {Lq} x {Lk}")
    if mask is None:
        mask = jnp.ones((B, 1, Lq, Lk), bool)
    if mask.dtype != jnp.bool_ or mask.shape[1] != 1:
        raise PDLMError("splash attention takes a boolean mask shared by the heads, (B, 1, Lq, Lk)")
    if k.shape[2] != H:  # grouped K/V heads: one K/V per query head
        k, v = (jnp.repeat(x, H // x.shape[2], axis=2) for x in (k, v))
    mask = jnp.broadcast_to(mask, (B, 1, Lq, Lk))

    def one(q, k, v, m):  # one example: (heads, L, head_dim), mask (1, Lq, Lk)
        kernel = splash.make_splash_mha(m, head_shards=1, q_seq_shards=1, interpret=interpret)
        # make_splash_mha turns the mask info's `is_dynamic_mask` flag into an array, a tracer under jit that
        # the kernel then branches on in Python: give it back as the bool it is
        infos = [getattr(kernel, f) for f in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info")]
        kernel = splash.SplashAttentionKernel(*[i if i is None else i._replace(is_dynamic_mask=True) for i in infos],
                                              **kernel.kwargs)
        return kernel(q, k, v)

    def examples(q, k, v, mask):  # (B, L, heads, head_dim) -> one kernel call per example
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = jax.lax.map(lambda xs: one(*xs), (heads_first(q), heads_first(k), heads_first(v), mask))
        return heads_first(out)

    q = (q * scale).astype(q.dtype)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return examples(q, k, v, mask)
    # XLA cannot partition a Pallas kernel: under a mesh (the training step sets it) each device runs it on
    # its own examples (the batch split as `sharding.batch_sharding` splits it), every other axis whole
    from pdlm_jax.sharding import logical_spec

    spec = logical_spec((B,), ("batch",), mesh)
    return jax.shard_map(examples, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(q, k, v, mask)
