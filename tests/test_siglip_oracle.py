"""SigLIP tower and projector vs HuggingFace transformers' SiglipVisionModel (random tiny configs)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import load_reference_tree
from safetensors.torch import save_file

from pdlm_jax.config import PDLMConfig, RegionConfig, VisionConfig
from pdlm_jax.modeling import Projector, SiglipVision, load_params, pixel_shuffle

# (hidden, mlp, layers, heads, image, patch, layer_norm_eps, vision_select_layer)
CONFIGS = {
    "select-2": (32, 64, 3, 2, 32, 8, 1e-6, -2),  # the reference's choice: output of layer n-2, no post-LN
    "select-1": (48, 96, 2, 4, 48, 16, 1e-5, -1),  # last layer + post_layernorm
    "select0": (32, 64, 3, 4, 32, 8, 1e-6, 0),  # non-negative: output of layer 0 (SPEC §3.3 quirk)
}


def _configs(name: str) -> tuple[PDLMConfig, transformers.SiglipVisionConfig]:
    D, F, n, heads, image, patch, eps, sel = CONFIGS[name]
    cfg = PDLMConfig(
        vision=VisionConfig(hidden_size=D, intermediate_size=F, num_layers=n, num_heads=heads, image_size=image,
                            patch_size=patch, layer_norm_eps=eps),
        region=RegionConfig(image_size=image, patch_size=patch, mask_kernel_size=patch, vision_select_layer=sel),
    ).validate()
    hf = transformers.SiglipVisionConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=n,
                                         num_attention_heads=heads, image_size=image, patch_size=patch,
                                         layer_norm_eps=eps, hidden_act="gelu_pytorch_tanh",
                                         attn_implementation="eager")
    return cfg, hf


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """HF initialises biases to 0 and norms to 1; make every tensor random so the mapping is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if name.endswith("layer_norm1.weight") or "layernorm.weight" in name \
                or name.endswith("layer_norm2.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _our_tower(cfg, hf_model, tmp_path, *, dtype=jnp.float32) -> SiglipVision:
    # HF vision-model names are the reference names without the leading "vision_model.".
    save_file({f"vision_model.{k}": v.contiguous() for k, v in hf_model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    tree = load_reference_tree(tmp_path, cfg)
    tower = nnx.eval_shape(lambda: SiglipVision(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    load_params(tower, tree["vision"])
    return tower


def _hf_reference(cfg: PDLMConfig, hf_model, pixels_nchw, offsets=None) -> np.ndarray:
    """Selected-layer output of the HF tower; `offsets` (T, N, D) are added to the patch embeddings
    (before the position embedding), as the reference's vit_forward_with_mask does."""
    hooks = []
    if offsets is not None:
        T, N, D = offsets.shape
        g = int(N**0.5)
        grid = offsets.reshape(T, g, g, D).permute(0, 3, 1, 2)
        hooks.append(hf_model.vision_model.embeddings.patch_embedding.register_forward_hook(
            lambda mod, inp, out: out + grid.to(out.dtype)))
    try:
        with torch.no_grad():
            out = hf_model(pixel_values=pixels_nchw, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    # hidden_states[0] is the embedding output, so hidden_states[i] is the output of i layers.
    hidden = out.last_hidden_state if cfg.uses_post_layernorm else out.hidden_states[cfg.num_vision_layers_used]
    return hidden.float().numpy()


def _max_err(ours, ref) -> float:
    return float(np.abs(np.asarray(jnp.asarray(ours, jnp.float32)) - ref).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vision_tower_matches_hf(name, tmp_path):
    cfg, hf_cfg = _configs(name)
    torch.manual_seed(0)
    hf_model = transformers.SiglipVisionModel(hf_cfg).eval()
    _randomize(hf_model, seed=1)
    tower = _our_tower(cfg, hf_model, tmp_path)
    v = cfg.vision
    pixels = torch.randn(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(2))
    offsets = 0.5 * torch.randn(3, v.num_patches, v.hidden_size, generator=torch.Generator().manual_seed(3))
    nhwc = jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())

    err_plain = _max_err(tower(nhwc), _hf_reference(cfg, hf_model, pixels))
    err_offsets = _max_err(tower(nhwc, jnp.asarray(offsets.numpy())), _hf_reference(cfg, hf_model, pixels, offsets))
    print(f"{name}: max|ours - HF| = {err_plain:.2e} (no offsets), {err_offsets:.2e} (offsets)")
    assert err_plain <= 1e-5 and err_offsets <= 1e-5


def test_vision_tower_matches_hf_bfloat16(tmp_path):
    """bf16 params and compute on both sides (torch eager bf16 on CPU). XLA and torch round intermediate
    values differently, so allow a few bf16 ulps of the largest activation (measured: 9.4e-2 at max 13.3)."""
    cfg, hf_cfg = _configs("select-2")
    torch.manual_seed(0)
    hf_model = transformers.SiglipVisionModel(hf_cfg).eval()
    _randomize(hf_model, seed=1)
    tower = _our_tower(cfg, hf_model, tmp_path, dtype=jnp.bfloat16)
    hf_model = hf_model.to(torch.bfloat16)
    v = cfg.vision
    pixels = torch.randn(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(2))
    pixels = pixels.to(torch.bfloat16)
    ref = _hf_reference(cfg, hf_model, pixels)
    ours = tower(jnp.asarray(pixels.float().permute(0, 2, 3, 1).numpy(), jnp.bfloat16))
    assert ours.dtype == jnp.bfloat16
    err = _max_err(ours, ref)
    print(f"bf16: max|ours - HF| = {err:.2e}, max|HF| = {np.abs(ref).max():.2f}")
    assert err <= np.abs(ref).max() / 64  # 2^-6 of the largest value = 2 to 4 bf16 ulps


def test_pixel_shuffle_channel_order():
    """SPEC §3.4: out[t, Y*g/2+X, dy*2C + dx*C + ch] = F[t, (2Y+dy)*g + 2X+dx, ch]."""
    T, g, C = 2, 4, 3
    feats = np.arange(T * g * g * C, dtype=np.float32).reshape(T, g * g, C)
    out = np.asarray(pixel_shuffle(jnp.asarray(feats)))
    assert out.shape == (T, (g // 2) ** 2, 4 * C)
    for Y in range(g // 2):
        for X in range(g // 2):
            for dy in range(2):
                for dx in range(2):
                    np.testing.assert_array_equal(out[:, Y * (g // 2) + X, (dy * 2 + dx) * C:(dy * 2 + dx + 1) * C],
                                                  feats[:, (2 * Y + dy) * g + 2 * X + dx])


def test_projector_uses_exact_gelu():
    """mlp2x_gelu vs torch nn.Sequential(Linear, GELU() [erf], Linear) with the same weights."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    proj = Projector(16, 8, rngs=nnx.Rngs(0))
    proj.fc1.kernel[...] = jnp.asarray(ref[0].weight.detach().numpy().T)
    proj.fc1.bias[...] = jnp.asarray(ref[0].bias.detach().numpy())
    proj.fc2.kernel[...] = jnp.asarray(ref[2].weight.detach().numpy().T)
    proj.fc2.bias[...] = jnp.asarray(ref[2].bias.detach().numpy())
    x = 3 * torch.randn(5, 16)
    with torch.no_grad():
        expected = ref(x).numpy()
    assert _max_err(proj(jnp.asarray(x.numpy())), expected) <= 1e-5
