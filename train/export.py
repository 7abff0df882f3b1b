"""Export a training checkpoint as a pdlm-infer model directory.

    python -m train.export --run runs/demo [--step N] --out DIR

`pdlm-train` exports the final step itself (run.output_dir/export); this exports any kept step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdlm_jax.errors import PDLMError


def export_step(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    import orbax.checkpoint as ocp

    from train import checkpointing, config

    saved = config.read_saved(run_dir)
    if saved is None:
        raise PDLMError(f"{run_dir} is not a pdlm-train output directory (no config.yaml)")
    cfg = config.from_dict(saved)
    mgr = checkpointing.manager(run_dir, create=False)
    step = mgr.latest_step() if step is None else step
    if step is None or step not in mgr.all_steps():
        raise PDLMError(f"no checkpoint for step {step} in {mgr.directory} (have {mgr.all_steps()})")
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return checkpointing.export(out, cfg.model_config(), checkpointing.full_params(state), cfg.tokenizer_dir(),
                                cfg.sampler(), {"config": cfg.to_dict(), "steps": step})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run.output_dir of a pdlm-train run")
    ap.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ap.add_argument("--out", required=True, help="output model directory")
    args = ap.parse_args(argv)
    try:
        print(export_step(args.run, args.out, args.step))
    except PDLMError as e:
        print(f"train.export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
