"""Pretraining the demo models' vision tower on the synthetic scenes, as SigLIP is pretrained before the recipe
composes PerceptionDLM-Base from it (SPEC-train-base T3).

A Base model reads a scene off its image tokens: "Which shape is red?" is answered by finding the red tokens
and reading what shape they belong to. SigLIP's patch features already say what each patch shows; a tiny tower
trained only for region captions does not (its shapes came from the 4×4 silhouette of RoI cells), and a random
LM trained from answers alone learns that slowly (docs/TRAINING.md). Here every image token (a cell of the
pixel-shuffled feature map, what the projector reads) is taught, with linear heads that are then dropped, the
words of the shape it lies on — its shape, colour, size and place, or background — and the scene's shape count.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from pdlm_jax.config import PDLMConfig
from pdlm_jax.modeling.pdm import load_params
from pdlm_jax.modeling.projector import pixel_shuffle
from pdlm_jax.modeling.siglip import SiglipVision
from pdlm_jax.regions.tiling import tile_image
from train import synthetic

log = logging.getLogger("pdlm-train")

# Per token: the word of the shape it lies on (index 0: background), and the scene's count.
ATTRIBUTES = {
    "shape": synthetic.SHAPES,
    "color": synthetic.COLORS,
    "size": tuple(synthetic.SIZES),
    "row": synthetic.ROWS,
    "column": synthetic.COLUMNS,
}
ON_SHAPE = 0.25  # a token lies on a shape when the shape covers this much of its cell
SEED_OFFSET = 7919  # scenes of their own stream: never the Base training's or the held-out evaluation's


@dataclasses.dataclass(frozen=True)
class TowerPretraining:
    steps: int
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0


def token_labels(scene: synthetic.Scene, side: int) -> dict[str, np.ndarray]:
    """Per cell of the side×side token grid (the image resized to a square tile, as one tile is): the index of
    each attribute of the shape covering it (1-based; 0 background), and "count" (the number of shapes - 1)."""
    cover = np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize((side, side), Image.BOX))
                      for m in scene.masks])  # (n, side, side) fraction of each cell each shape covers
    owner = np.where(cover.max(0) >= ON_SHAPE, cover.argmax(0) + 1, 0)
    labels = {}
    for name, words in ATTRIBUTES.items():
        values = [0] + [1 + (words.index(getattr(item, name)) if name not in ("row", "column")
                             else getattr(item, name)) for item in scene.items]
        labels[name] = np.asarray(values, np.int32)[owner]
    labels["count"] = np.full((side, side), len(scene.items) - 1, np.int32)
    return {k: v.reshape(-1) for k, v in labels.items()}


class TowerWithHeads(nnx.Module):
    def __init__(self, cfg: PDLMConfig, rngs: nnx.Rngs):
        self.vision = SiglipVision(cfg, rngs=rngs)
        width = 4 * cfg.vision.hidden_size  # pixel-shuffled features, as the projector reads them
        sizes = {name: len(words) + 1 for name, words in ATTRIBUTES.items()} | {"count": synthetic.MAX_SHAPES}
        self.heads = nnx.Dict({name: nnx.Linear(width, n, rngs=rngs) for name, n in sizes.items()})

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        features = pixel_shuffle(self.vision(pixels))
        return {name: head(features) for name, head in self.heads.items()}


def _batch(cfg: PDLMConfig, seed: int, first: int, size: int):
    side = cfg.region.feature_grid
    pixels, labels = [], []
    for i in range(first, first + size):
        scene = synthetic.make_scene(seed + SEED_OFFSET, i, task="sentences")
        pixels.append(tile_image(Image.fromarray(scene.image), cfg.region).pixel_values[0])
        labels.append(token_labels(scene, side))
    return np.stack(pixels), {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}


def pretrain(cfg: PDLMConfig, vision_params: dict, run: TowerPretraining) -> tuple[dict, list[dict]]:
    """The tower `vision_params` after `run.steps` steps of per-token attribute prediction; (params, log rows)."""
    model = TowerWithHeads(cfg, nnx.Rngs(run.seed))
    load_params(model.vision, vision_params)
    schedule = optax.warmup_cosine_decay_schedule(0.0, run.lr, max(run.steps // 20, 1), run.steps, run.lr * 0.05)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, pixels, labels):
        def loss_fn(model):
            logits = model(pixels)
            losses = {k: optax.softmax_cross_entropy_with_integer_labels(v, labels[k]).mean()
                      for k, v in logits.items()}
            # attributes: accuracy on the tokens that lie on a shape (most tokens are background)
            on_shape = labels["shape"] > 0
            accuracy = {k: jnp.sum((v.argmax(-1) == labels[k]) & (on_shape | (k == "count"))) /
                        (jnp.sum(on_shape) if k != "count" else on_shape.size) for k, v in logits.items()}
            return sum(losses.values()), (losses, accuracy)

        (loss, (losses, accuracy)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, accuracy

    rows, start = [], time.perf_counter()
    for i in range(run.steps):
        pixels, labels = _batch(cfg, run.seed, i * run.batch_size, run.batch_size)
        loss, accuracy = step(model, optimizer, jnp.asarray(pixels), {k: jnp.asarray(v) for k, v in labels.items()})
        if i == 0 or (i + 1) % 50 == 0 or i + 1 == run.steps:
            row = {"step": i + 1, "loss": float(loss), **{f"accuracy_{k}": round(float(v), 4)
                                                           for k, v in accuracy.items()},
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            log.info("tower pretraining %s", row)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model.vision, nnx.Param))), rows
