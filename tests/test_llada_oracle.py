"""LLaDA LM vs HuggingFace transformers' Llama (a LLaDA block is a Llama block without the causal mask)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import load_reference_tree
from safetensors.torch import save_file

from pdlm_jax.config import LMConfig, preset
from pdlm_jax.modeling import LLaDA, load_params
from pdlm_jax.ops.attention import _fused, dot_product_attention
from pdlm_jax.ops.rope import inverse_frequencies, power_float32, rope_cos_sin, rope_exponents

LM = LMConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=4,
              rope_theta=500000.0, rms_norm_eps=1e-5)
B, L = 2, 24


@pytest.fixture(scope="module")
def hf_model():
    hf_cfg = transformers.LlamaConfig(
        vocab_size=LM.vocab_size, hidden_size=LM.hidden_size, intermediate_size=LM.intermediate_size,
        num_hidden_layers=LM.num_layers, num_attention_heads=LM.num_heads, num_key_value_heads=LM.num_kv_heads,
        rope_theta=LM.rope_theta, rms_norm_eps=LM.rms_norm_eps, hidden_act="silu", attention_bias=False,
        mlp_bias=False, tie_word_embeddings=False, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random norms too (HF initialises them to 1)
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _our_lm(hf_model, tmp_path, dtype) -> LLaDA:
    cfg = preset("tiny").replace(lm=LM)
    save_file({f"language_model.{k}": v.contiguous() for k, v in hf_model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    lm = nnx.eval_shape(lambda: LLaDA(LM, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    load_params(lm, load_reference_tree(tmp_path, cfg)["lm"])
    return lm


def _structured_mask(seed: int) -> np.ndarray:
    """Random boolean (B, 1, L, L) mask with the diagonal allowed (every query sees something)."""
    rng = np.random.default_rng(seed)
    allowed = rng.random((B, 1, L, L)) < 0.5
    allowed |= np.eye(L, dtype=bool)
    return allowed


def _hf_forward(hf_model, embeds, additive_mask, positions=None):
    with torch.no_grad():
        hidden = hf_model.model(inputs_embeds=embeds, attention_mask=additive_mask, position_ids=positions)
        hidden = hidden.last_hidden_state
        return hidden.float().numpy(), hf_model.lm_head(hidden).float().numpy()


def _max_err(ours, ref) -> float:
    return float(np.abs(np.asarray(jnp.asarray(ours, jnp.float32)) - ref).max())


@pytest.mark.parametrize("case", ["bidirectional", "structured-bool", "structured-additive", "positions"])
def test_llada_matches_llama(case, hf_model, tmp_path):
    lm = _our_lm(hf_model, tmp_path, jnp.float32)
    embeds = torch.randn(B, L, LM.hidden_size, generator=torch.Generator().manual_seed(2))
    allowed = np.ones((B, 1, L, L), bool) if case == "bidirectional" else _structured_mask(3)
    additive = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
    positions = np.tile(np.arange(L) * 3 + 5, (B, 1)) if case == "positions" else None

    ref_hidden, ref_logits = _hf_forward(hf_model, embeds, torch.from_numpy(additive),
                                         None if positions is None else torch.from_numpy(positions))
    ours_mask = {"bidirectional": None, "structured-bool": allowed, "structured-additive": additive,
                 "positions": allowed}[case]
    hidden = lm(jnp.asarray(embeds.numpy()), None if ours_mask is None else jnp.asarray(ours_mask),
                None if positions is None else jnp.asarray(positions))
    logits = lm.logits(hidden)
    assert logits.dtype == jnp.float32 and logits.shape == (B, L, LM.vocab_size)
    err_h, err_l = _max_err(hidden, ref_hidden), _max_err(logits, ref_logits)
    print(f"{case}: hidden {err_h:.2e}, logits {err_l:.2e}")
    assert err_h <= 1e-4 and err_l <= 1e-4


def test_llada_matches_llama_bfloat16(hf_model, tmp_path):
    """bf16 params and compute on both sides (torch eager bf16 on CPU); XLA and torch round intermediates
    differently, so the tolerance is a few bf16 ulps of the largest value (see the printed measurement)."""
    lm = _our_lm(hf_model, tmp_path, jnp.bfloat16)
    hf_bf16 = transformers.LlamaForCausalLM(hf_model.config).eval()
    hf_bf16.load_state_dict(hf_model.state_dict())
    hf_bf16 = hf_bf16.to(torch.bfloat16)
    embeds = torch.randn(B, L, LM.hidden_size, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    allowed = _structured_mask(3)
    additive = torch.from_numpy(np.where(allowed, 0.0, -1e30)).to(torch.bfloat16)
    ref_hidden, ref_logits = _hf_forward(hf_bf16, embeds, additive)
    hidden = lm(jnp.asarray(embeds.float().numpy(), jnp.bfloat16), jnp.asarray(allowed))
    assert hidden.dtype == jnp.bfloat16
    err_h, err_l = _max_err(hidden, ref_hidden), _max_err(lm.logits(hidden), ref_logits)
    print(f"bf16: hidden {err_h:.2e} (max {np.abs(ref_hidden).max():.2f}), "
          f"logits {err_l:.2e} (max {np.abs(ref_logits).max():.2f})")
    assert err_h <= np.abs(ref_hidden).max() / 64 and err_l <= np.abs(ref_logits).max() / 64


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_inv_freq_matches_reference_buffer(head_dim):
    """Bit-equal to the reference's float32 buffer; training rounds it to bf16 (quirk rope_inv_freq_float32)."""
    reference = (1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))).numpy()
    np.testing.assert_array_equal(inverse_frequencies(head_dim, 500000.0), reference)
    rounded = inverse_frequencies(head_dim, 500000.0, float32=False)
    np.testing.assert_array_equal(rounded, torch.tensor(reference).to(torch.bfloat16).float().numpy())
    assert (rounded != reference).any()


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_power_rounding_does_not_depend_on_the_cpu(head_dim, theta):
    """Every float64 power lies > 2^-40 (relative) from a float32 rounding boundary, so any float64 `pow`
    (glibc's, numpy's SIMD ones: all within a few float64 ulps, 2^-52) rounds to the same float32."""
    exact = np.array([math.pow(float(np.float32(theta)), float(e)) for e in rope_exponents(head_dim)])
    rounded = power_float32(theta, rope_exponents(head_dim)).astype(np.float64)
    neighbour = np.where(exact > rounded, np.nextafter(rounded.astype(np.float32), np.float32(np.inf)),
                         np.nextafter(rounded.astype(np.float32), np.float32(0))).astype(np.float64)
    boundary = (rounded + neighbour) / 2
    assert (np.abs(exact - rounded) <= np.abs(exact - neighbour)).all()  # rounded to nearest
    assert (np.abs(exact - boundary) / exact > 2.0**-40).all()


def test_rope_tables_accurate_under_jit():
    """Long sequences (L ~ 2000 in the demo) must keep float32-accurate phases inside jit."""
    positions = jnp.arange(4096)
    cos, sin = jax.jit(lambda p: rope_cos_sin(p, 128, 500000.0, jnp.float32))(positions)
    freqs = np.arange(4096, dtype=np.float32)[:, None] * inverse_frequencies(128, 500000.0)  # float32 product
    angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    assert np.abs(np.asarray(cos) - np.cos(angles)).max() <= 1e-6
    assert np.abs(np.asarray(sin) - np.sin(angles)).max() <= 1e-6


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_attention_matches_jax_reference(mask_kind):
    """Our xla path vs jax.nn.dot_product_attention's own xla path, through the same argument mapping
    (`_fused`) the cudnn implementation uses; masks broadcast from (B, 1, Lq, Lk)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 4, 16)), jnp.float32) for n in (10, 12, 12))
    allowed = rng.random((2, 1, 10, 12)) < 0.6
    allowed[..., 0] = True
    mask = {"none": None, "bool": jnp.asarray(allowed),
            "additive": jnp.asarray(np.where(allowed, 0.0, -1e9), jnp.float32)}[mask_kind]
    ours = dot_product_attention(q, k, v, mask)
    assert _max_err(ours, np.asarray(_fused(q, k, v, mask, 16**-0.5, "xla"))) <= 1e-6
