"""Inputs of the roi_align oracle checks, shared by tests/test_roi_align.py and the script that records
torchvision's outputs for them (tests/fixtures/record_torchvision_roi_align.py)."""

from __future__ import annotations

import numpy as np

# (output_size, sampling_ratio, aligned, spatial_scale): every branch of torchvision's kernel
SETTINGS = [((2, 2), 2, True, 1.0), ((4, 4), 2, True, 0.5), ((3, 5), 1, True, 1.0), ((7, 7), 3, True, 0.25),
            ((1, 1), 2, True, 1 / 32), ((4, 4), 2, False, 1.0), ((3, 2), 0, True, 1.0), ((2, 3), 0, False, 0.5)]
PADDED_SIZES = [(4, 6), (12, 20), (8, 16)]  # valid (h, w) windows of one padded map


def random_boxes(rng, n, h, w):
    """Boxes inside, straddling and fully outside an (h, w) map, plus degenerate/inverted ones."""
    x1 = rng.uniform(-0.5 * w, 1.3 * w, n)
    y1 = rng.uniform(-0.5 * h, 1.3 * h, n)
    x2 = x1 + rng.uniform(-1.0, 0.8 * w, n)
    y2 = y1 + rng.uniform(-1.0, 0.8 * h, n)
    extra = [[-9, -9, -3, -2], [w + 2, h + 2, w + 9, h + 5], [1, 1, 1, 1], [0, 0, w, h]]
    return np.concatenate([np.stack([x1, y1, x2, y2], 1), extra]).astype(np.float32)


def setting_case(output_size, sampling_ratio, aligned, scale):
    """A random (9, 13, 5) channel-last map and 44 boxes for one setting."""
    rng = np.random.default_rng(0)
    h, w, c = 9, 13, 5
    fmap = rng.standard_normal((h, w, c)).astype(np.float32)
    return fmap, random_boxes(rng, 40, h / scale, w / scale)


def padded_cases():
    """One (12, 20, 3) map and, per valid size, boxes within that window."""
    rng = np.random.default_rng(1)
    padded = rng.standard_normal((12, 20, 3)).astype(np.float32)
    return padded, [random_boxes(rng, 20, h, w) for h, w in PADDED_SIZES]


def setting_key(i: int) -> str:
    return f"setting{i}"
