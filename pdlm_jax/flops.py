"""Analytic model FLOPs (matmuls 2·m·n·k and attention) of the programs we run; benchmarks (MFU) and
`pdlm-aot` (rooflines) share them. Elementwise work, norms and softmax are left out (a few percent)."""

from __future__ import annotations

from pdlm_jax.config import PDLMConfig


def vision_flops(cfg: PDLMConfig, tiles: int) -> float:
    """Vision tower (patch embedding + the layers used) and projector for `tiles` tiles."""
    v, lm = cfg.vision, cfg.lm
    patches = v.num_patches
    vision_layer = 2 * patches * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) \
        + 4 * patches**2 * v.hidden_size
    projector_in = cfg.projector_input_size
    return tiles * (cfg.num_vision_layers_used * vision_layer + 2 * patches * 3 * v.patch_size**2 * v.hidden_size
                    + 2 * cfg.region.num_image_tokens * (projector_in + lm.hidden_size) * lm.hidden_size)


def lm_flops(cfg: PDLMConfig, rows: int, keys: int, logit_rows: int) -> float:
    """One LM forward over `rows` query rows attending to `keys` keys, lm_head at `logit_rows` rows."""
    lm = cfg.lm
    h, kv = lm.hidden_size, lm.num_kv_heads * lm.head_dim
    dense = 2 * (2 * h * h + 2 * h * kv + 3 * h * lm.intermediate_size)  # per row: q, o, k, v, gate, up, down
    return lm.num_layers * (rows * dense + 4 * rows * keys * h) + 2 * logit_rows * h * lm.vocab_size


def model_flops(cfg: PDLMConfig, tiles: int, lengths: list[int], regions: list[int], gen_length: int,
                full_forwards: int, cached_forwards: int) -> float:
    """Matmul FLOPs (2·m·n·k) of one image's passes: vision once per pass, `full_forwards` LM forwards over all
    L rows and `cached_forwards` over the k·(G+2) caption rows only; lm_head at the k·G slots."""
    total = 0.0
    for length, k in zip(lengths, regions):
        slots = k * gen_length
        total += vision_flops(cfg, tiles) + full_forwards * lm_flops(cfg, length, length, slots) \
            + cached_forwards * lm_flops(cfg, k * (gen_length + 2), length, slots)
    return total


def train_step_flops(cfg: PDLMConfig, batch: int, tiles: int, length: int, logit_rows: int | None = None) -> float:
    """Model FLOPs of one training update on `batch` samples: 3 × the forward (forward + backward), the usual
    MFU convention (rematerialisation's extra forward is not counted). lm_head at `logit_rows` rows per sample
    (default: all `length`)."""
    rows = length if logit_rows is None else logit_rows
    return 3 * batch * (vision_flops(cfg, tiles) + lm_flops(cfg, length, length, rows))
