"""PerceptionDLM model vs the reference fixtures (tensors.npz of the PyTorch reference on tiny models)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FIXTURE_NAMES, fixture_config, fixture_dir, fixture_oracle, load_reference_tree

from pdlm_jax import keymap
from pdlm_jax.config import preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling import PerceptionDLM, from_tree, pixel_shuffle
from pdlm_jax.trees import nest

TENSOR_KEYS = ("pixel_values", "mask_values", "vit_mask_embeddings", "vit_hidden_states", "projector_input",
               "vision_embeds", "inputs_embeds", "attention_allowed", "first_logits")


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    name = request.param
    cfg = fixture_config(name)
    with np.load(fixture_dir(name) / "tensors.npz") as z:
        t = {k: z[k] for k in TENSOR_KEYS}
    oracle = fixture_oracle(name)
    # Host-side inputs of the vision path: NHWC pixels, per-patch mask activity, prompt ids (SPEC §3.1).
    p = cfg.region.mask_kernel_size
    top_left = t["mask_values"][:, :, 0, ::p, ::p]  # (k, T, g, g): nearest downsampling reads the top-left pixel
    inputs = {
        "pixels": t["pixel_values"].transpose(0, 2, 3, 1),
        "mask_patches": np.round((top_left + 1.0) / 2.0 * 255.0) != 255,
        "prompt_ids": np.array([int(re.fullmatch(r"<Prompt(\d+)>", s).group(1))
                                for s in oracle["masks"]["prompt_tokens"]]),
    }
    return name, cfg, load_reference_tree(fixture_dir(name), cfg), t, inputs


def _forward(model: PerceptionDLM, inputs: dict, t: dict) -> dict[str, np.ndarray]:
    """Every checked intermediate, as float32 numpy (one jit: a single compilation per model)."""

    @nnx.jit
    def run(model, pixels, mask_patches, prompt_ids, inputs_embeds, allowed):
        offsets = model.mask_offsets(mask_patches, prompt_ids)
        hidden = model.vision(pixels, offsets)
        out = {"vit_mask_embeddings": offsets, "vit_hidden_states": hidden, "projector_input": pixel_shuffle(hidden),
               "vision_embeds": model.projector(pixel_shuffle(hidden)),
               "lm_hidden": model.lm(inputs_embeds, allowed)}
        assert all(v.dtype == model.dtype for v in out.values())  # activations stay in the compute dtype
        out["first_logits"] = model.lm.logits(out.pop("lm_hidden"))
        return {k: v.astype(jnp.float32) for k, v in out.items()}

    out = run(model, inputs["pixels"], inputs["mask_patches"], inputs["prompt_ids"], t["inputs_embeds"],
              t["attention_allowed"])
    return {k: np.asarray(v) for k, v in out.items()}


def _reference(t: dict, key: str) -> np.ndarray:
    return t[key][-2] if key == "vit_hidden_states" else t[key]  # vision_select_layer = -2


def test_fixture_float32(fixture):
    name, cfg, tree, t, inputs = fixture
    ours = _forward(from_tree(cfg, tree, dtype=jnp.float32), inputs, t)
    errors = {k: float(np.abs(v - _reference(t, k)).max()) for k, v in ours.items()}
    print(name, {k: f"{e:.1e}" for k, e in errors.items()})
    assert errors.pop("first_logits") <= 1e-3
    assert all(e <= 1e-5 for e in errors.values()), errors


def _bf16_errors(ours: dict, t: dict) -> tuple[dict[str, float], float]:
    """Max error relative to max|reference| per tensor, and the relative RMS error of the logits."""
    rel_max = {k: float(np.abs(v - _reference(t, k)).max() / np.abs(_reference(t, k)).max()) for k, v in ours.items()}
    diff, ref = ours["first_logits"] - t["first_logits"], t["first_logits"]
    return rel_max, float(np.sqrt((diff**2).mean() / (ref**2).mean()))


def test_fixture_bfloat16(fixture):
    """bf16 params and compute against the float32 reference. Vision tensors land within ~1% of their
    largest value (measured <= 1.2e-2 relative). The tiny random LLaDA amplifies rounding strongly
    (rounding only its float32 inputs to bf16 already moves logits by ~1.0), so logits are checked by
    relative RMS error (measured <= 0.13) and max error (measured <= 0.3 of max|logit|).
    tiny_v1 also runs mixed precision (float32 params, bf16 compute)."""
    name, cfg, tree, t, inputs = fixture
    param_dtypes = (jnp.bfloat16, jnp.float32) if name == "tiny_v1" else (jnp.bfloat16,)
    for param_dtype in param_dtypes:
        model = from_tree(cfg, tree, dtype=jnp.bfloat16, param_dtype=param_dtype)
        assert model.lm.lm_head.kernel.dtype == param_dtype
        rel_max, rel_rms = _bf16_errors(_forward(model, inputs, t), t)
        print(name, jnp.dtype(param_dtype).name, {k: f"{e:.1e}" for k, e in rel_max.items()},
              f"logits rel rms {rel_rms:.2f}")
        assert rel_max.pop("first_logits") <= 0.5 and rel_rms <= 0.25
        assert all(e <= 2**-5 for e in rel_max.values()), rel_max


def test_from_tree_rejects_mismatches():
    cfg = preset("tiny")
    tree = jax.tree.map(lambda s: np.zeros(s, np.float32), keymap.expected_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))
    nested = nest(tree)
    model = from_tree(cfg, nested, dtype=jnp.bfloat16)
    assert model.lm.lm_head.kernel.dtype == jnp.bfloat16  # cast to param_dtype (defaults to dtype)

    nested["lm"]["final_norm"]["scale"] = np.zeros((3,), np.float32)
    with pytest.raises(PDLMError, match="lm/final_norm/scale"):
        from_tree(cfg, nested)
    del nested["lm"]["final_norm"]
    with pytest.raises(PDLMError, match="missing.*lm/final_norm/scale"):
        from_tree(cfg, nested)
