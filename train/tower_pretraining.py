"""Pretraining the demo models' vision tower and projector on the synthetic scenes, as SigLIP is pretrained
(and LLaVA-style recipes align a projector) before the recipe composes PerceptionDLM-Base (SPEC-train-base T3).

A Base model reads a scene off its image tokens: "Which shape is red?" is answered by finding the red tokens
and reading what shape they lie on. SigLIP's patch features already say what each patch shows; a tiny tower
trained from answers alone does not learn it (docs/TRAINING.md). Three targets teach it here, through heads
that are then dropped:
- every image token (a cell of the pixel-shuffled feature map, after the projector: what the LM reads) is
  taught the words of the shape it lies on — its shape, colour, size and place, or background — and the
  scene's shape count;
- every shape, from the mask-weighted mean of its tokens, its shape, colour and size;
- every patch, which of its OCCUPANCY×OCCUPANCY sub-cells a shape covers: the silhouette inside the patch.

A shape is a property of an outline, not of one patch: the tower can say what silhouette each patch holds,
but a linear read-out of its features stays at chance on the shape (measured: 35% after 1,000 steps). The
projector, an MLP over the four patches of a token, turns the silhouette into the shape, so it is pretrained
with the tower and kept.
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
from pdlm_jax.modeling.projector import Projector, pixel_shuffle
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
POOLED = ("shape", "color", "size")  # per shape, from the mean of its tokens
ON_SHAPE = 0.25  # a token lies on a shape when the shape covers this much of its cell
OCCUPANCY = 4  # sub-cells per patch side of the silhouette target
SEED_OFFSET = 7919  # scenes of their own stream: never the Base training's or the held-out evaluation's


@dataclasses.dataclass(frozen=True)
class TowerPretraining:
    steps: int
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0


def _cover(masks: list[np.ndarray], side: int) -> np.ndarray:
    """(n, side, side): the fraction of each cell of a side×side grid (the image resized to a square tile, as
    one tile is) that each mask covers."""
    return np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize((side, side), Image.BOX))
                     for m in masks])


def token_labels(scene: synthetic.Scene, side: int, cover: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per cell of the side×side token grid: the index of each attribute of the shape covering it (1-based; 0
    background), and "count" (the number of shapes - 1). `cover`: `_cover(scene.masks, side)`, if computed."""
    cover = _cover(scene.masks, side) if cover is None else cover
    owner = np.where(cover.max(0) >= ON_SHAPE, cover.argmax(0) + 1, 0)
    labels = {}
    for name, words in ATTRIBUTES.items():
        values = [0] + [1 + (words.index(getattr(item, name)) if name not in ("row", "column")
                             else getattr(item, name)) for item in scene.items]
        labels[name] = np.asarray(values, np.int32)[owner]
    labels["count"] = np.full((side, side), len(scene.items) - 1, np.int32)
    return {k: v.reshape(-1) for k, v in labels.items()}


def shape_labels(scene: synthetic.Scene, side: int, cover: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per shape slot (MAX_SHAPES, padded): "weights" over the side×side tokens (its cover, summing to 1),
    "valid", and the index of each POOLED attribute. `cover`: as in `token_labels`."""
    n, slots = len(scene.items), synthetic.MAX_SHAPES
    cover = (_cover(scene.masks, side) if cover is None else cover).reshape(n, -1)
    weights = np.zeros((slots, side * side), np.float32)
    weights[:n] = cover / cover.sum(1, keepdims=True)
    labels = {"weights": weights, "valid": np.arange(slots) < n}
    for name in POOLED:
        words = ATTRIBUTES[name]
        labels[name] = np.asarray([words.index(getattr(i, name)) for i in scene.items] + [0] * (slots - n), np.int32)
    return labels


def patch_occupancy(scene: synthetic.Scene, grid: int) -> np.ndarray:
    """(grid², OCCUPANCY²) float: whether a shape covers each sub-cell of each patch (row-major patches)."""
    cover = _cover([np.any(scene.masks, axis=0)], grid * OCCUPANCY)[0] >= 0.5
    cells = cover.reshape(grid, OCCUPANCY, grid, OCCUPANCY).transpose(0, 2, 1, 3)
    return cells.reshape(grid * grid, OCCUPANCY * OCCUPANCY).astype(np.float32)


class TowerWithHeads(nnx.Module):
    def __init__(self, cfg: PDLMConfig, rngs: nnx.Rngs):
        self.vision = SiglipVision(cfg, rngs=rngs)
        self.projector = Projector(cfg.projector_input_size, cfg.lm.hidden_size, rngs=rngs)
        width = cfg.lm.hidden_size
        sizes = {name: len(words) + 1 for name, words in ATTRIBUTES.items()} | {"count": synthetic.MAX_SHAPES}
        self.heads = nnx.Dict({name: nnx.Linear(width, n, rngs=rngs) for name, n in sizes.items()})
        self.pooled = nnx.Dict({name: nnx.Linear(width, len(ATTRIBUTES[name]), rngs=rngs) for name in POOLED})
        self.occupancy = nnx.Linear(cfg.vision.hidden_size, OCCUPANCY * OCCUPANCY, rngs=rngs)

    def __call__(self, pixels: jax.Array, weights: jax.Array):
        """Logits per token, per shape (`weights`: (B, shapes, tokens)) and per patch."""
        patches = self.vision(pixels)
        tokens = self.projector(pixel_shuffle(patches))
        shapes = jnp.einsum("bst,btc->bsc", weights, tokens)
        return ({name: head(tokens) for name, head in self.heads.items()},
                {name: head(shapes) for name, head in self.pooled.items()}, self.occupancy(patches))


def _batch(cfg: PDLMConfig, seed: int, first: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    side, grid = cfg.region.feature_grid, cfg.vision.image_size // cfg.vision.patch_size
    pixels, labels = [], []
    for i in range(first, first + size):
        scene = synthetic.make_scene(seed + SEED_OFFSET, i, task="sentences")
        pixels.append(tile_image(Image.fromarray(scene.image), cfg.region).pixel_values[0])
        cover = _cover(scene.masks, side)
        labels.append(token_labels(scene, side, cover)
                      | {f"pooled_{k}": v for k, v in shape_labels(scene, side, cover).items()}
                      | {"occupancy": patch_occupancy(scene, grid)})
    return np.stack(pixels), {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}


def _losses(model: TowerWithHeads, pixels: jax.Array, labels: dict[str, jax.Array]):
    tokens, shapes, occupancy = model(pixels, labels["pooled_weights"])
    on_shape = labels["shape"] > 0
    losses, accuracy = {}, {}
    for name, logits in tokens.items():
        losses[name] = optax.softmax_cross_entropy_with_integer_labels(logits, labels[name]).mean()
        # attributes: accuracy on the tokens that lie on a shape (most tokens are background)
        counted = on_shape if name != "count" else jnp.ones_like(on_shape)
        accuracy[name] = jnp.sum((logits.argmax(-1) == labels[name]) & counted) / jnp.sum(counted)
    valid = labels["pooled_valid"]
    for name, logits in shapes.items():
        target = labels[f"pooled_{name}"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
        losses[f"pooled_{name}"] = jnp.sum(ce * valid) / jnp.sum(valid)
        accuracy[f"pooled_{name}"] = jnp.sum((logits.argmax(-1) == target) & valid) / jnp.sum(valid)
    losses["occupancy"] = optax.sigmoid_binary_cross_entropy(occupancy, labels["occupancy"]).mean()
    accuracy["occupancy"] = jnp.mean((occupancy > 0) == (labels["occupancy"] > 0.5))
    return sum(losses.values()), accuracy


def pretrain(cfg: PDLMConfig, params: dict, run: TowerPretraining) -> tuple[dict, list[dict]]:
    """`params` ({"vision", "projector"}) after `run.steps` steps on the three targets; (params, log rows: the
    loss and accuracies, accuracies averaged over the steps since the previous row)."""
    model = TowerWithHeads(cfg, nnx.Rngs(run.seed))
    for name in ("vision", "projector"):
        load_params(getattr(model, name), params[name])
    schedule = optax.warmup_cosine_decay_schedule(0.0, run.lr, max(run.steps // 20, 1), run.steps, run.lr * 0.05)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, pixels, labels):
        (loss, accuracy), grads = nnx.value_and_grad(_losses, has_aux=True)(model, pixels, labels)
        optimizer.update(model, grads)
        return loss, accuracy

    rows, recent, start = [], [], time.perf_counter()
    for i in range(run.steps):
        pixels, labels = _batch(cfg, run.seed, i * run.batch_size, run.batch_size)
        loss, accuracy = step(model, optimizer, jnp.asarray(pixels), jax.tree.map(jnp.asarray, labels))
        recent.append(accuracy)
        if i == 0 or (i + 1) % 50 == 0 or i + 1 == run.steps:
            mean = jax.tree.map(lambda *v: round(float(np.mean(v)), 4), *recent)
            row = {"step": i + 1, "loss": float(loss), **{f"accuracy_{k}": v for k, v in sorted(mean.items())},
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            recent = []
            log.info("tower pretraining %s", row)
    trained = nnx.state(model, nnx.Param)
    return {name: jax.device_get(nnx.to_pure_dict(trained[name])) for name in ("vision", "projector")}, rows
