"""Export a training checkpoint as a pdlm-infer model directory.

    python -m train.export_step --run runs/demo [--step N] --out DIR [--adapter]

`pdlm-train` exports the final step itself (run.output_dir/export, and run.output_dir/adapter for LoRA);
this exports any kept step. A LoRA run's step is exported with its adapters merged into the base weights
(a plain checkpoint), or with --adapter as an adapter directory (`pdlm-infer --adapter`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdlm_jax.errors import PDLMError


def export_step(run_dir: str | Path, out: str | Path, step: int | None = None, adapter: bool = False) -> Path:
    from train import checkpointing, config, init_from

    saved = config.read_saved(run_dir)
    if saved is None:
        raise PDLMError(f"{run_dir} is not a pdlm-train output directory (no config.yaml)")
    cfg = config.from_dict(saved)
    step, state = checkpointing.saved_state(run_dir, step)
    model_cfg = cfg.model_config()
    sampler = cfg.exported_sampler(model_cfg)
    provenance = {"config": cfg.to_dict(), "steps": step}
    tokenizer_dir = init_from.training_tokenizer(cfg, model_cfg, run_dir)
    if adapter:
        if not cfg.lora.enabled:
            raise PDLMError(f"--adapter: {run_dir} is not a LoRA run (lora.rank is 0)")
        return checkpointing.export_adapter(out, state["params"], cfg.lora, model_cfg, tokenizer_dir, sampler,
                                            {**provenance, "base": cfg.model.init_from})
    if cfg.lora.enabled:  # the checkpoint holds the adapters; the frozen base comes from where training began
        from pdlm_jax import lora

        params = lora.merge(base_params(cfg, model_cfg), state["params"], cfg.lora)
    else:
        params = checkpointing.full_params(state)
    return checkpointing.export(out, model_cfg, params, tokenizer_dir, sampler, provenance)


def base_params(cfg, model_cfg) -> dict:
    """The float32 parameters training began from (model.init_from, else the seed's initialisation)."""
    import jax
    import numpy as np

    from pdlm_jax import checkpoint as pdlm_ckpt
    from pdlm_jax import sharding as shd
    from train import step as step_lib

    if cfg.model.init_from:
        return pdlm_ckpt.restore_params(cfg.model.init_from, dtype=np.float32)[1]
    mesh = shd.make_mesh(f"data:{len(jax.devices())}")
    return step_lib.init_params(model_cfg, cfg.run.seed, mesh, cfg.model.mask_embed_init_std,
                                cfg.model.vision_pos_embed_init)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run.output_dir of a pdlm-train run")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--out", required=True, help="output model directory")
    ap.add_argument("--adapter", action="store_true", help="LoRA runs: write the adapter directory, not merged weights")
    args = ap.parse_args(argv)
    try:
        print(export_step(args.run, args.out, args.step, args.adapter))
    except PDLMError as e:
        print(f"train.export_step: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
