"""`pdlm-train --config FILE [section.key=value ...]` (also `python -m train`).

Trains PerceptionDLM with the masked-diffusion objective on one device, a multi-device host or a
multi-host pod (see docs/TRAINING.md). Resumes automatically from the latest checkpoint in
`run.output_dir/checkpoints`; writes `run.output_dir/log.jsonl` and, at the end, a pdlm-infer checkpoint
in `run.output_dir/export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from pdlm_jax.errors import PDLMError

log = logging.getLogger("pdlm-train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdlm-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML training config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override config entries, e.g. optim.lr=1e-4 run.mesh=data:2,fsdp:4")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (auto-detects TPU pods, SLURM, ...)")
    p.add_argument("--coordinator", help="host:port of process 0 (multi-node GPU without a cluster manager)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _init_distributed(args) -> None:
    import jax

    if args.coordinator or args.distributed:
        kwargs = {}
        if args.coordinator:
            kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                          process_id=args.process_id)
        jax.distributed.initialize(**kwargs)


def train(cfg, progress: bool = True, callback=None) -> dict:
    """Run training for a TrainConfig; returns {'losses': [...], 'export': path or None, 'state': ...}.

    callback(step, record) is called after each step (and its checkpoint, if any) — e.g. an eval hook;
    an exception it raises stops training like an interruption would.
    """
    import jax
    import numpy as np
    from tqdm import tqdm

    from pdlm_jax import checkpoint as pdlm_ckpt
    from pdlm_jax import keymap
    from pdlm_jax import sharding as shd
    from pdlm_jax.regions.tokenizer import Tokenizer
    from train import checkpointing, data, step as step_lib

    if cfg.run.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.run.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    model_cfg = cfg.model_config()
    tokenizer = Tokenizer(cfg.tokenizer_dir())
    if tokenizer.vocab_size > model_cfg.lm.vocab_size:
        raise PDLMError(f"the tokenizer has {tokenizer.vocab_size} tokens but lm.vocab_size is "
                        f"{model_cfg.lm.vocab_size}; use the checkpoint's tokenizer or a larger vocab")
    if jax.process_count() > 1 and (len(cfg.data.tile_buckets) > 1 or len(cfg.data.length_buckets) > 1):
        # each host pads its own samples, so with several buckets hosts could disagree on the batch shape
        raise PDLMError("multi-host training needs one tile bucket and one length bucket: set "
                        "data.tile_buckets and data.length_buckets to a single value each")
    per_update = cfg.data.batch_size * cfg.optim.grad_accum
    pipe = data.build_pipeline(dataclasses.replace(cfg.data, batch_size=per_update), model_cfg, tokenizer,
                               process_index=jax.process_index(), process_count=jax.process_count())
    total = cfg.run.max_steps or pipe.steps_per_epoch * cfg.data.epochs
    mesh = shd.make_mesh(cfg.run.mesh)
    trainer = step_lib.trainer_for(cfg, model_cfg, mesh, total, tokenizer.special.mask)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    iterator = iter(pipe.dataset)
    mgr = checkpointing.manager(out / "checkpoints", cfg.run.keep, cfg.run.async_save)

    shapes = {p: jax.ShapeDtypeStruct(s, np.float32) for p, s in keymap.expected_shapes(model_cfg).items()}
    abstract = trainer.abstract_state(pdlm_ckpt.nest(shapes), cfg.model.freeze)
    resumed = checkpointing.restore(mgr, trainer.checkpointed(abstract), iterator)
    start, state = resumed or (0, None)
    if resumed is not None:
        log.info("resumed from %s at step %d", mgr.directory, start)
    if state is None or cfg.lora.enabled:  # LoRA checkpoints hold the adapters; the base is loaded again
        if cfg.model.init_from:
            _, params = pdlm_ckpt.restore_params(cfg.model.init_from, dtype=np.float32,
                                                 shardings=shd.param_shardings(pdlm_ckpt.nest(shapes), mesh))
        else:
            params = step_lib.init_params(model_cfg, cfg.run.seed, mesh, cfg.model.mask_embed_init_std,
                                          cfg.model.vision_pos_embed_init)
        state = {**trainer.init_state(params, cfg.model.freeze), **(state or {})}
        del params

    is_main = jax.process_index() == 0
    log_file = open(out / "log.jsonl", "a") if is_main else None
    losses = []
    bar = tqdm(total=total, initial=start, disable=not (progress and is_main), desc="train", dynamic_ncols=True)
    t_prev = time.perf_counter()
    try:
        for step in range(start, total):
            try:
                batch = next(iterator)
            except StopIteration:
                log.warning("data exhausted after %d steps", step)
                break
            state, metrics = trainer.step(state, trainer.put_batch(batch))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            record = {"step": step + 1, "loss": metrics["loss"], "lr": metrics["lr"],
                      "grad_norm": metrics["grad_norm"], "step_time": dt, "tokens_per_s": metrics["tokens"] / dt,
                      "masked_tokens": int(metrics["masked_tokens"])}
            losses.append(metrics["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if (step + 1) % cfg.run.log_every == 0:
                    bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in record.items()))
            if (step + 1) % cfg.run.save_every == 0 or step + 1 == total:
                checkpointing.save(mgr, step + 1, trainer.checkpointed(state), iterator)
            if callback is not None:
                callback(step + 1, record)
        mgr.wait_until_finished()
    finally:
        bar.close()
        mgr.close()
        if log_file is not None:
            log_file.close()
    exported = None
    if cfg.run.export:
        params, adapters = trainer.model_params(state), (state["params"] if cfg.lora.enabled else None)
        if jax.process_count() > 1:  # every process takes part in gathering the sharded params
            from jax.experimental import multihost_utils
            params, adapters = multihost_utils.process_allgather((params, adapters), tiled=True)
        sampler = checkpointing.sampler_for(cfg.sampler(), cfg.model.init_from)
        provenance = {"config": cfg.to_dict(), "steps": total, "final_loss": losses[-1:]}
        path = checkpointing.export(out / "export", model_cfg, params, cfg.tokenizer_dir(), sampler, provenance)
        if is_main:  # the export is collective; process 0 reports it
            exported = path
            log.info("exported %s", exported)
            if adapters is not None:
                log.info("exported the LoRA adapters to %s", checkpointing.export_adapter(
                    out / "adapter", adapters, cfg.lora, model_cfg, cfg.tokenizer_dir(), sampler,
                    {**provenance, "base": cfg.model.init_from}))
    return {"losses": losses, "export": exported, "state": state}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file operation at INFO
    try:
        from train import config as train_config

        cfg = train_config.load(args.config, args.overrides)
        _init_distributed(args)
        train(cfg, progress=not args.no_progress)
    except PDLMError as e:
        print(f"pdlm-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
