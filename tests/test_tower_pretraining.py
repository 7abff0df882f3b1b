"""train.tower_pretraining: the per-token, per-shape and per-patch labels of a scene, and pretraining that learns
them."""

import numpy as np

from pdlm_jax.config import PDLMConfig, RegionConfig, VisionConfig
from train import synthetic, tower_pretraining


def test_token_labels_name_the_shape_under_each_token():
    scene = synthetic.make_scene(0, 3, task="sentences")
    side = 12
    labels = tower_pretraining.token_labels(scene, side)
    assert all(v.shape == (side * side,) for v in labels.values())
    assert set(labels["count"]) == {len(scene.items) - 1}
    for mask, item in zip(scene.masks, scene.items):
        # the cell holding the mask's centroid lies on this shape (shapes never overlap)
        cy, cx = np.argwhere(mask).mean(0)
        cell = int(cy * side / mask.shape[0]) * side + int(cx * side / mask.shape[1])
        if labels["shape"][cell]:
            assert labels["shape"][cell] == 1 + synthetic.SHAPES.index(item.shape)
            assert labels["color"][cell] == 1 + synthetic.COLORS.index(item.color)
            assert (labels["row"][cell], labels["column"][cell]) == (1 + item.row, 1 + item.column)
    covered = np.any([np.asarray(m) for m in scene.masks], axis=0)
    assert (labels["shape"] == 0).sum() > side * side * (1 - covered.mean()) * 0.5  # background is most tokens
    names = set(tower_pretraining.ATTRIBUTES)
    assert all(((labels[n] == 0) == (labels["shape"] == 0)).all() for n in names)


def test_shape_and_patch_labels():
    scene = synthetic.make_scene(0, 3, task="sentences")
    side, grid = 6, 12
    pooled = tower_pretraining.shape_labels(scene, side)
    n = len(scene.items)
    assert pooled["valid"].tolist() == [True] * n + [False] * (synthetic.MAX_SHAPES - n)
    assert np.allclose(pooled["weights"][:n].sum(1), 1) and not pooled["weights"][n:].any()
    assert [synthetic.SHAPES[i] for i in pooled["shape"][:n]] == [item.shape for item in scene.items]
    occupancy = tower_pretraining.patch_occupancy(scene, grid)
    k = tower_pretraining.OCCUPANCY
    assert occupancy.shape == (grid * grid, k * k)
    # the sub-cells put back in place give the shapes' union at grid·k resolution: about the masks' coverage
    image = occupancy.reshape(grid, grid, k, k).transpose(0, 2, 1, 3).reshape(grid * k, grid * k)
    assert abs(image.mean() - np.any(scene.masks, axis=0).mean()) < 0.02


def test_pretraining_lowers_the_loss():
    cfg = PDLMConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                         image_size=64, patch_size=8),
                     region=RegionConfig(image_size=64, patch_size=8, mask_kernel_size=8, max_tiles=1))
    import jax
    from flax import nnx

    model = tower_pretraining.TowerWithHeads(cfg, nnx.Rngs(1))
    start = {name: nnx.to_pure_dict(nnx.state(getattr(model, name), nnx.Param)) for name in ("vision", "projector")}
    params, rows = tower_pretraining.pretrain(cfg, start, tower_pretraining.TowerPretraining(steps=40, batch_size=2))
    assert jax.tree.structure(params) == jax.tree.structure(start)
    assert rows[0]["step"] == 1 and rows[-1]["loss"] < 0.8 * rows[0]["loss"]  # mostly background: learnt at once
