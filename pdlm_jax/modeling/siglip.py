"""SigLIP vision transformer as used by PerceptionDLM (SPEC §3.1–3.3).

Only the encoder layers up to `vision_select_layer` are built; the output is that layer's hidden state
(post-layernormed only when vision_select_layer == -1). The pooling head is never used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdlm_jax.config import PDLMConfig, VisionConfig
from pdlm_jax.modeling.common import init, scan_layers, stack_layers
from pdlm_jax.ops.attention import dot_product_attention

_kernel = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _linear(n_in, n_out, names, *, dtype, param_dtype, rngs):
    return nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=init(_kernel, *names), bias_init=init(_zeros, names[1]))


def _layer_norm(cfg: VisionConfig, *, dtype, param_dtype, rngs):
    # flax LayerNorm computes statistics and the affine map in float32, then casts (like torch bf16).
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                         scale_init=init(_ones, "norm"), bias_init=init(_zeros, "norm"), rngs=rngs)


class HeadsProjection(nnx.Module):
    """The attention output projection: a (D, D) kernel and bias applied to the heads (B, L, heads, head_dim)
    as they come instead of after a reshape to one dim. With the reshape, XLA:GPU fuses the heads transpose
    into a Triton GEMM whose tiling it cannot solve for head_dim 72 once a batch of images reaches the tower
    ("Couldn't find output tile sizes", H100).

    Not an nnx.Linear: LoRA and quantization (qwix, which intercepts Linear calls) leave it as it is.
    """

    def __init__(self, num_heads: int, head_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        D = num_heads * head_dim
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        # the parameters, their names and their draws from `rngs` are those of an nnx.Linear(D, D)
        self.kernel = nnx.Param(init(_kernel, "heads", "embed")(rngs.params(), (D, D), param_dtype))
        self.bias = nnx.Param(init(_zeros, "embed")(rngs.params(), (D,), param_dtype))

    def __call__(self, heads: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype).reshape(self.num_heads, self.head_dim, -1)
        return jnp.einsum("blhd,hde->ble", heads.astype(self.dtype), kernel) + self.bias[...].astype(self.dtype)


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        D, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = _linear(D, D, ("embed", "heads"), **kw)
        self.k = _linear(D, D, ("embed", "heads"), **kw)
        self.v = _linear(D, D, ("embed", "heads"), **kw)
        self.o = HeadsProjection(cfg.num_heads, cfg.head_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, L, _ = x.shape
        split = lambda t: t.reshape(B, L, self.num_heads, self.head_dim)
        return self.o(dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                            scale=self.head_dim**-0.5))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        # gelu_pytorch_tanh, evaluated in float32 and rounded once (a single torch op on bf16).
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(h.dtype)
        return self.fc2(h)


class SiglipEncoderLayer(nnx.Module):
    """Pre-LN block: h + Attn(LN1(h)), then h + MLP(LN2(h))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln1 = _layer_norm(cfg, **kw)
        self.attn = SiglipAttention(cfg, **kw)
        self.ln2 = _layer_norm(cfg, **kw)
        self.mlp = SiglipMLP(cfg, **kw)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class SiglipVision(nnx.Module):
    """remat: recompute each layer's activations in the backward pass (`scan_layers`)."""

    def __init__(self, cfg: PDLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: bool = False):
        v, kw = cfg.vision, dict(dtype=dtype, param_dtype=param_dtype)
        self.dtype, self.remat = dtype, remat
        self.patch_embed = nnx.Conv(
            v.num_channels, v.hidden_size, kernel_size=(v.patch_size, v.patch_size),
            strides=(v.patch_size, v.patch_size), padding="VALID",
            kernel_init=init(_kernel, None, None, None, "embed"), bias_init=init(_zeros, "embed"),
            rngs=rngs, **kw)
        self.pos_embed = nnx.Embed(v.num_patches, v.hidden_size, rngs=rngs,
                                   embedding_init=init(nnx.initializers.normal(0.02), None, "embed"), **kw)
        self.layers = stack_layers(lambda r: SiglipEncoderLayer(v, rngs=r, **kw), cfg.num_vision_layers_used, rngs)
        self.post_ln = _layer_norm(v, rngs=rngs, **kw) if cfg.uses_post_layernorm else None

    def __call__(self, pixel_values: jax.Array, mask_offsets: jax.Array | None = None) -> jax.Array:
        """pixel_values (T, S, S, C) NHWC; mask_offsets optional (T, num_patches, D) -> (T, num_patches, D)."""
        patches = self.patch_embed(pixel_values.astype(self.dtype))
        T, gh, gw, D = patches.shape
        h = patches.reshape(T, gh * gw, D)  # patch index r * grid + c
        if mask_offsets is not None:
            h = h + mask_offsets.astype(self.dtype)  # before the position embedding: bf16 rounding order
        h = h + self.pos_embed.embedding[...].astype(self.dtype)
        h = scan_layers(self.layers, h, remat=self.remat)
        return self.post_ln(h) if self.post_ln is not None else h
