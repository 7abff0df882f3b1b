"""PerceptionDLM: SigLIP tower with mask-id offsets, pixel shuffle, projector and the LLaDA LM (SPEC §3, §4).

The parameter tree (`nnx.state(model, nnx.Param)`, paths joined with '/') is exactly
`pdlm_jax.keymap.expected_shapes(cfg)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pdlm_jax import sharding
from pdlm_jax.config import PDLMConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.modeling.common import init
from pdlm_jax.modeling.llada import LLaDA
from pdlm_jax.modeling.projector import Projector, pixel_shuffle
from pdlm_jax.modeling.siglip import SiglipVision
from pdlm_jax.ops.roi_replay import assemble_embeddings, roi_replay
from pdlm_jax.region_batch import RegionBatch
from pdlm_jax.trees import flatten


class PerceptionDLM(nnx.Module):
    """remat: per-layer rematerialisation of both towers in the backward pass (training's memory saver)."""

    def __init__(self, cfg: PDLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_implementation: str = "xla", remat: bool = False):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype = cfg, dtype
        self.vision = SiglipVision(cfg, remat=remat, **kw)
        # PerceptionDLM-Base (cfg.is_base, SPEC-base) has no mask-id embedding.
        self.mask_embed = None if cfg.is_base else nnx.Embed(
            cfg.region.prompt_numbers, cfg.vision.hidden_size,
            embedding_init=init(nnx.initializers.normal(0.02), None, "embed"), **kw)
        self.projector = Projector(cfg.projector_input_size, cfg.lm.hidden_size, **kw)
        self.lm = LLaDA(cfg.lm, rope_inv_freq_float32=cfg.quirks.rope_inv_freq_float32,
                        attention_implementation=attention_implementation, remat=remat, **kw)

    def mask_offsets(self, mask_patches: jax.Array, prompt_ids: jax.Array) -> jax.Array:
        """Sum of mask_embed[prompt_id] over the masks active at each patch (SPEC §3.1).

        mask_patches (k, T, g, g) bool or 0/1 (padded masks all False); prompt_ids (k,) -> (T, g*g, D).
        """
        k, T, gh, gw = mask_patches.shape
        active = mask_patches.reshape(k, T, gh * gw, 1).astype(self.dtype)
        rows = self.mask_embed(prompt_ids.astype(jnp.int32))  # (k, D)
        offsets = jnp.zeros((T, gh * gw, rows.shape[-1]), self.dtype)
        for i in range(k):  # k <= prompt_numbers, static: sequential adds keep the reference's rounding order
            offsets = offsets + active[i] * rows[i]
        return offsets

    def embed_inputs(self, batch: RegionBatch, *, training: bool = False, mesh: Mesh | None = None) -> jax.Array:
        """Clean LM input embeddings (B, L, H) of a batch: token embeddings with the vision rows and RoI vectors
        spliced in. Inference (`pipeline`) and training (`train.step`) both embed through here.

        training: RoI replay with the training-time spatial scale (SPEC §14.1); `batch.roi_boxes` must have been
        converted with the same flag (`ops.roi_replay.roi_boxes`).
        mesh: keep the vision activations and the embeddings split over the batch axes. Left to itself, XLA's
        propagation may follow the FSDP-sharded weights instead and compute every image's vision activations
        and the (B, L, vocab) logits of the whole batch on every device (pdlm-aot: > 124 GiB per chip for the
        8B model at B = 64, L = 4096 on a v5p-64).
        """
        batch.check(self.cfg)

        def split_batch(x):
            return x if mesh is None else jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.shape))

        # The vision tower over all B·T tiles as one leading axis (a constraint under a vmap cannot name the batch).
        # PerceptionDLM-Base (no mask-id embedding, batches without regions) embeds the plain tiles.
        pixels, (B, T) = batch.pixel_values, batch.pixel_values.shape[:2]
        offsets = None
        if self.mask_embed is not None:
            offsets = jax.vmap(self.mask_offsets)(batch.mask_patches, batch.prompt_ids)
            offsets = split_batch(offsets.reshape(B * T, *offsets.shape[2:]))
        features = self.vision(split_batch(pixels.reshape(B * T, *pixels.shape[2:]).astype(self.dtype)), offsets)
        vision = self.projector(pixel_shuffle(split_batch(features)))
        vision = split_batch(vision.reshape(B, T, *vision.shape[1:]))

        def one(vision, row: RegionBatch):
            if self.mask_embed is None:
                rois = jnp.zeros((0, self.cfg.region.roi_tokens, vision.shape[-1]), vision.dtype)
            else:
                rois = roi_replay(vision, row.grid, row.roi_boxes, self.cfg.region, self.cfg.quirks,
                                  training=training, num_tiles=row.num_tiles)
            return assemble_embeddings(self.lm.embed(row.input_ids), vision, rois, row.image_positions,
                                       row.roi_positions)

        return split_batch(jax.vmap(one)(vision, batch))

    def encode_tiles(self, pixel_values: jax.Array) -> jax.Array:
        """Plain vision path of PerceptionDLM-Base (no mask offsets, SPEC-base §B2): (T, S, S, 3) -> (T, n, H_lm)."""
        return self.projector(pixel_shuffle(self.vision(pixel_values)))


def load_params(module: nnx.Module, tree: dict) -> None:
    """Set every parameter of `module` (concrete or from `nnx.eval_shape`) from a nested dict of arrays.

    Values are cast to each parameter's dtype (the module's param_dtype). Paths and shapes must match
    exactly; a mismatch raises PDLMError naming the offending paths.
    """
    given = flatten(tree)
    params = {"/".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    missing, unexpected = sorted(params.keys() - given.keys()), sorted(given.keys() - params.keys())
    if missing or unexpected:
        raise PDLMError(f"parameter tree does not match the model: missing {missing}, unexpected {unexpected}; "
                        "convert the checkpoint with pdlm-convert for this config")
    updates = []
    for name, (path, var) in params.items():
        value = given[name]
        if tuple(value.shape) != tuple(var.shape):
            raise PDLMError(f"parameter {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(var.shape)}; the checkpoint was made for another config")
        updates.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
    nnx.update(module, nnx.from_flat_state(updates))


def from_tree(cfg: PDLMConfig, tree: dict, *, dtype=jnp.float32, param_dtype=None,
              attention_implementation: str = "xla") -> PerceptionDLM:
    """Build a PerceptionDLM from a nested dict of arrays in our layout, without random initialisation."""
    param_dtype = dtype if param_dtype is None else param_dtype
    model = nnx.eval_shape(lambda: PerceptionDLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                                 attention_implementation=attention_implementation))
    load_params(model, tree)
    return model
