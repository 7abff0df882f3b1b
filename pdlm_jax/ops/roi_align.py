"""RoI-Align with torchvision's exact semantics (SPEC §7.2.5), channel-last, jit-able.

Mirrors `torchvision.ops.roi_align` (CPU kernel): sample points per bin, the border rules (samples beyond
[-1, H] x [-1, W] contribute 0, others are clamped), bilinear weights, and the order of the float32 sums.
The valid map size may be a traced scalar over a statically padded map, so one compiled program serves
every tile grid.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from jax import lax

def _div(a: jnp.ndarray, b) -> jnp.ndarray:
    """a / b rounded like C++. XLA rewrites division by a constant as multiplication by the rounded
    reciprocal (13 / 5 -> 2.6000001); adding `0 * a` makes the divisor a runtime value."""
    return a / (jnp.asarray(b, jnp.float32) + jnp.float32(0) * a)


Fetch = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (y, x) int indices (...) -> values (..., C)


def _axis_samples(start, bin_size, n_bins: int, grid, max_grid: int, size):
    """Sample coordinates along one axis -> (low, high, l, inside, present), each (K, n_bins, max_grid).

    `grid` is the per-RoI sample count (static int or (K,) traced); `present` masks samples beyond it.
    """
    f32 = jnp.float32
    b = jnp.arange(n_bins, dtype=f32)[None, :, None]
    i = jnp.arange(max_grid, dtype=f32)[None, None, :]
    g = jnp.asarray(grid, f32).reshape(-1, 1, 1)
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    # torchvision: start + p * bin + (i + .5) * bin / grid, evaluated left to right in float32.
    coord = (start + b * bin_size) + _div((i + f32(0.5)) * bin_size, g)
    size = jnp.asarray(size, jnp.int32)
    inside = (coord >= -1.0) & (coord <= size.astype(f32))
    coord = jnp.maximum(coord, 0.0)
    low = jnp.floor(coord).astype(jnp.int32)  # coord >= 0, so floor == C++ (int) truncation
    at_edge = low >= size - 1
    low = jnp.where(at_edge, size - 1, low)
    high = jnp.where(at_edge, size - 1, low + 1)
    l = jnp.where(at_edge, 0.0, coord - low.astype(f32))
    present = jnp.arange(max_grid)[None, None, :] < jnp.asarray(grid, jnp.int32).reshape(-1, 1, 1)
    return low, high, l, inside, present


def roi_align_gather(fetch: Fetch, boxes: jnp.ndarray, output_size: tuple[int, int], height, width,
                     spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True,
                     max_adaptive_grid: int = 8) -> jnp.ndarray:
    """RoI-Align over a map read through `fetch(y, x)`. boxes (K, 4) = (x1, y1, x2, y2) in input units.

    Returns (K, ph, pw, C) float32. `sampling_ratio <= 0` is torchvision's adaptive grid
    ceil(roi_size / bins) per RoI, computed up to `max_adaptive_grid` samples per bin side (static bound).
    """
    ph, pw = output_size
    f32 = jnp.float32
    boxes = boxes.astype(f32)
    offset = f32(0.5) if aligned else f32(0.0)
    scale = f32(spatial_scale)
    x1, y1, x2, y2 = (boxes[:, i] * scale - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision forces malformed RoIs to 1x1 in the legacy mode only
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = _div(roi_h, ph), _div(roi_w, pw)
    if sampling_ratio > 0:
        grid_h = grid_w = sampling_ratio
        max_h = max_w = sampling_ratio
    else:
        grid_h = jnp.ceil(_div(roi_h, ph)).astype(jnp.int32)
        grid_w = jnp.ceil(_div(roi_w, pw)).astype(jnp.int32)
        max_h = max_w = max_adaptive_grid
    count = jnp.maximum(jnp.asarray(grid_h) * jnp.asarray(grid_w), 1).astype(f32).reshape(-1, 1, 1, 1)

    ylo, yhi, ly, yin, ypres = _axis_samples(y1, bin_h, ph, grid_h, max_h, height)
    xlo, xhi, lx, xin, xpres = _axis_samples(x1, bin_w, pw, grid_w, max_w, width)

    def add_sample(n, acc):  # torchvision accumulates the samples in (iy, ix) order
        iy, ix = n // max_w, n % max_w

        def at(a, i):  # (K, n_bins, max_grid) -> (K, n_bins) at sample i
            return jnp.take(a, i, axis=2)

        yl, yh, y_l = at(ylo, iy)[:, :, None], at(yhi, iy)[:, :, None], at(ly, iy)[:, :, None]
        xl, xh, x_l = at(xlo, ix)[:, None, :], at(xhi, ix)[:, None, :], at(lx, ix)[:, None, :]
        use = (at(yin, iy) & at(ypres, iy))[:, :, None] & (at(xin, ix) & at(xpres, ix))[:, None, :]
        hy, hx = 1.0 - y_l, 1.0 - x_l
        w1, w2, w3, w4 = hy * hx, hy * x_l, y_l * hx, y_l * x_l  # (K, ph, pw)
        v = (((w1[..., None] * fetch(yl, xl) + w2[..., None] * fetch(yl, xh))
              + w3[..., None] * fetch(yh, xl)) + w4[..., None] * fetch(yh, xh))
        return acc + jnp.where(use[..., None], v, 0.0)

    # Sample 0 fixes the output shape (K, ph, pw, C); the loop adds the others in order.
    acc = lax.fori_loop(1, max_h * max_w, add_sample, add_sample(0, 0.0))
    return _div(acc, count)


def roi_align(features: jnp.ndarray, boxes: jnp.ndarray, output_size: tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = 2, aligned: bool = True,
              height=None, width=None, max_adaptive_grid: int = 8) -> jnp.ndarray:
    """torchvision `roi_align` on a channel-last map (H, W, C) -> (K, ph, pw, C) float32.

    `height`/`width` (possibly traced) give the valid top-left part of a padded map; default: all of it.
    """
    height = features.shape[0] if height is None else height
    width = features.shape[1] if width is None else width
    feats = features.astype(jnp.float32)
    return roi_align_gather(lambda y, x: feats[y, x], boxes, output_size, height, width, spatial_scale,
                            sampling_ratio, aligned, max_adaptive_grid)
