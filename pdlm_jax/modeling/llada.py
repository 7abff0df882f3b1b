"""LLaDA bidirectional language model in HF layout (SPEC §4).

A LLaDA block is a Llama block without the causal mask. Every block also has a `forward` that returns the
rotated keys/values it computed and can attend over cached keys/values of the other positions: the prefix
cache of the fast sampling mode (`LLaDA.prefill` / `LLaDA.forward_rows`) runs the same code as the exact mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pdlm_jax.config import LMConfig
from pdlm_jax.modeling.common import init, scan_layers, stack_layers
from pdlm_jax.ops.attention import dot_product_attention
from pdlm_jax.ops.rope import apply_rope, rope_cos_sin

_kernel = nnx.initializers.normal(0.02)  # LLaDA initializer_range


def take_rows(a: jax.Array, rows: jax.Array) -> jax.Array:
    """a (B, L, ...) gathered at positions rows (B, C) -> (B, C, ...); positions >= L (padding) read row L-1."""
    return jax.vmap(lambda a, r: a[jnp.minimum(r, a.shape[0] - 1)])(a, rows)


def put_rows(a: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """a (B, L, ...) with rows (B, C) replaced by values (B, C, ...); positions >= L (padding) are dropped."""
    return jax.vmap(lambda a, r, v: a.at[r].set(v.astype(a.dtype), mode="drop"))(a, rows, values)


def _linear(n_in, n_out, names, *, dtype, param_dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=init(_kernel, *names))


class RMSNorm(nnx.Module):
    """Normalise in float32, cast to the compute dtype, then multiply by the weight (SPEC §4.2)."""

    def __init__(self, size: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(init(nnx.initializers.ones_init(), "norm")(rngs.params(), (size,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


class LLaDAAttention(nnx.Module):
    def __init__(self, cfg: LMConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "xla"):
        H, kw = cfg.hidden_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.head_dim, self.implementation = cfg.num_heads, cfg.head_dim, implementation
        self.q = _linear(H, H, ("embed", "heads"), **kw)
        self.k = _linear(H, H, ("embed", "heads"), **kw)
        self.v = _linear(H, H, ("embed", "heads"), **kw)
        self.o = _linear(H, H, ("heads", "embed"), **kw)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries and keys and values, each (B, L, heads, head_dim)."""
        B, L, _ = x.shape
        split = lambda t: t.reshape(B, L, self.num_heads, self.head_dim)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        return self.forward(x, cos, sin, mask)[0]

    def forward(self, x, cos, sin, mask, cache=None, rows=None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Output and the (rotated) keys/values of x's rows.

        With `cache` = (K, V) of all L positions, each (B, L, heads, head_dim), x holds only the rows at
        positions `rows` (B, C): their fresh keys/values replace the cached ones and x's queries attend over
        all L positions (mask (B, 1, C, L)).
        """
        q, k, v = self.qkv(x, cos, sin)
        keys, values = (k, v) if cache is None else (put_rows(cache[0], rows, k), put_rows(cache[1], rows, v))
        out = dot_product_attention(q, keys, values, mask, scale=self.head_dim**-0.5,
                                    implementation=self.implementation)
        return self.o(out.reshape(*x.shape[:2], -1)), (k, v)


class LLaDAMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        H, I, kw = cfg.hidden_size, cfg.intermediate_size, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = _linear(H, I, ("embed", "mlp"), **kw)
        self.up = _linear(H, I, ("embed", "mlp"), **kw)
        self.down = _linear(I, H, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        g = self.gate(x)
        g = jax.nn.silu(g.astype(jnp.float32)).astype(g.dtype)  # one rounded op, as torch on bf16
        return self.down(g * self.up(x))


class LLaDABlock(nnx.Module):
    """Pre-norm block: h = x + Attn(norm(x)); out = h + MLP(norm(h))."""

    def __init__(self, cfg: LMConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "xla"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = LLaDAAttention(cfg, implementation=implementation, **kw)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = LLaDAMLP(cfg, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        return self.forward(x, cos, sin, mask)[0]

    def forward(self, x, cos, sin, mask, cache=None, rows=None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block and its attention's keys/values (see `LLaDAAttention.forward` for `cache` and `rows`)."""
        attended, kv = self.attn.forward(self.input_norm(x), cos, sin, mask, cache, rows)
        h = x + attended
        return h + self.mlp(self.post_norm(h)), kv


class LLaDA(nnx.Module):
    """Embedding, stacked bidirectional blocks, final RMSNorm and an untied lm_head.

    remat: recompute each layer's activations in the backward pass of `__call__` (`scan_layers`).
    """

    def __init__(self, cfg: LMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 rope_inv_freq_float32: bool = True, attention_implementation: str = "xla", remat: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.cfg, self.dtype, self.rope_inv_freq_float32 = cfg, dtype, rope_inv_freq_float32
        self.remat = remat
        # `embed(ids)` returns embed_tokens[ids] in the compute dtype.
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                               embedding_init=init(_kernel, "vocab", "embed"), **kw)
        self.layers = stack_layers(
            lambda r: LLaDABlock(cfg, rngs=r, implementation=attention_implementation, **kw), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **kw)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, **kw)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype,
                            float32_inv_freq=self.rope_inv_freq_float32)

    def __call__(self, embeds: jax.Array, mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """embeds (B, L, H); mask boolean (True = attend) or additive, broadcastable to (B, heads, L, L);
        positions (L,) or (B, L), default arange(L). Returns the final-normed hidden states (B, L, H)."""
        if positions is None:
            positions = jnp.arange(embeds.shape[1])
        cos, sin = self.rope(positions)
        h = scan_layers(self.layers, embeds.astype(self.dtype), cos, sin, mask, remat=self.remat)
        return self.final_norm(h)

    def prefill(self, embeds: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`__call__` (positions arange(L)) that also returns every layer's keys and values, each stacked to
        (layers, B, L, heads, head_dim): the cache that `forward_rows` reads."""
        cos, sin = self.rope(jnp.arange(embeds.shape[1]))
        h, cache = self._scan_forward(embeds.astype(self.dtype), cos, sin, mask)
        return self.final_norm(h), cache

    def forward_rows(self, x: jax.Array, rows: jax.Array, mask: jax.Array,
                     cache: tuple[jax.Array, jax.Array]) -> jax.Array:
        """Final-normed hidden states of only the rows x (B, C, H) at positions rows (B, C); every other
        position contributes the keys/values in `cache` (from `prefill`). mask (B, 1, C, L)."""
        cos, sin = self.rope(rows)
        h, _ = self._scan_forward(x.astype(self.dtype), cos, sin, mask, cache, rows)
        return self.final_norm(h)

    def _scan_forward(self, h, cos, sin, mask, cache=None, rows=None):
        """The stacked blocks' `forward` as one `lax.scan`, with the per-layer cache as a scanned input."""
        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, layer_cache = xs
            return nnx.merge(graphdef, layer_state).forward(h, cos, sin, mask, layer_cache, rows)

        return jax.lax.scan(body, h, (state, cache))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """lm_head on whatever rows are given (gather generation slots first), as float32."""
        return self.lm_head(hidden).astype(jnp.float32)
