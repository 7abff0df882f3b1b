"""`pdlm-train --config FILE [section.key=value ...]` (also `python -m train`).

Trains PerceptionDLM with the masked-diffusion objective on one device, a multi-device host or a
multi-host pod (see docs/TRAINING.md). Resumes automatically from the latest checkpoint in
`run.output_dir/checkpoints`; writes `run.output_dir/log.jsonl`, TensorBoard events in
`run.output_dir/tensorboard` and, at the end, a pdlm-infer checkpoint in `run.output_dir/export`.
`run.output_dir` may be local, `file://` or any etils-epath URL (`gs://bucket/run`).
Exit codes: 0 done, 2 bad input (one-line error, before any data is read), 3 the data ran out before
run.max_steps, 4 stopped by SIGTERM / SIGINT / a preemption notice after saving a checkpoint (run the same
command again to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

from pdlm_jax.errors import PDLMError
from train import preemption

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
    p.add_argument("--allow-changed-settings", action="store_true",
                   help="resume even though run.max_steps, the lr schedule, the mesh or the batch changed")
    return p


def _init_distributed(args) -> None:
    import jax

    if args.coordinator or args.distributed:
        kwargs = {}
        if args.coordinator:
            kwargs = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                          process_id=args.process_id)
        jax.distributed.initialize(**kwargs)


# settings a resumed run must keep: they size the lr schedule, shape the optimizer state or the batches
RESUME_SETTINGS = ("run.max_steps", "run.mesh", "data.batch_size", "data.epochs", "data.loop", "data.weights",
                   "optim.lr", "optim.warmup_ratio", "optim.end_lr_ratio", "optim.grad_accum", "lora.rank",
                   "lora.alpha", "lora.target")
EXIT_INCOMPLETE = 3  # the data ran out before run.max_steps (data.loop: false)


def check_devices(cfg, num_devices: int) -> dict[str, int]:
    """The mesh axis sizes of run.mesh over `num_devices`; PDLMError if the mesh does not fit the devices or
    the batch does not split evenly over the batch axes (data x fsdp)."""
    from pdlm_jax import sharding as shd

    try:
        sizes = shd.parse_mesh(cfg.run.mesh, num_devices)
    except PDLMError as e:
        raise PDLMError(f"run.mesh: {e}") from None
    ways = sizes["data"] * sizes["fsdp"]
    if cfg.data.batch_size % ways:
        # the batch would be replicated: every device computing every sample of it
        raise PDLMError(f"data.batch_size {cfg.data.batch_size} does not split over the mesh's batch axes (data "
                        f"{sizes['data']} x fsdp {sizes['fsdp']} = {ways} devices): each device would compute the "
                        f"whole batch. Make data.batch_size a multiple of {ways}, or put devices on the tensor axis "
                        "(e.g. run.mesh=tensor:-1)")
    return sizes


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resume(out, new: dict, step: int, allow_changes: bool, write: bool) -> None:
    """Compare the saved config of a run being resumed with the new one: refuse changed RESUME_SETTINGS
    (unless allowed), warn about other changes, and keep the old config.yaml as config.step<N>.yaml."""
    from pdlm_jax.files import atomic_write
    from train.config import CONFIG_FILE, from_dict, read_saved

    saved = read_saved(out)
    if saved is None:
        return
    try:  # fill in the defaults of entries an older version did not save
        saved = from_dict(saved).to_dict()
    except PDLMError:
        pass
    old, cur = _flat(json.loads(json.dumps(saved, default=list))), _flat(json.loads(json.dumps(new, default=list)))
    changed = {k: (old.get(k), cur.get(k)) for k in sorted(old.keys() | cur.keys()) if old.get(k) != cur.get(k)}
    if not changed:
        return
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    blocked = [k for k in changed if k in RESUME_SETTINGS]
    if blocked and not allow_changes:
        raise PDLMError(f"{out} holds a run at step {step} trained with other settings ({listing}); resuming would "
                        "change its schedule or batches. Restore the old values, use a new run.output_dir, or pass "
                        "--allow-changed-settings to resume anyway")
    archive = out / f"config.step{step}.yaml"
    if write:
        log.warning("resuming at step %d with a changed config (%s); the previous config is kept as %s",
                    step, listing, archive.name)
        atomic_write(archive, (out / CONFIG_FILE).read_text())


ETA_AFTER_STEPS = 2  # the time to the first checkpoint is estimated from this step (the first one compiles)


def _count(tree) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree)) if tree else 0


def _log_summary(cfg, pipe, start: int, total: int, abstract: dict, mesh_sizes: dict) -> None:
    """What the run is about to do, before the first (compiling) step."""
    batch = cfg.data.batch_size * cfg.optim.grad_accum
    records = "; ".join(f"{name}: {n} records" for name, n in pipe.records.items())
    log.info("data: %s (%d items a pass%s)", records, pipe.num_items,
             f", {len(pipe.skipped)} records skipped" if pipe.skipped else "")
    log.info("steps %d..%d of %d; %d samples a step (data.batch_size %d x optim.grad_accum %d), at most %d tokens "
             "a step (padded to data.length_buckets)", start + 1, total, total, batch, cfg.data.batch_size,
             cfg.optim.grad_accum, batch * max(cfg.data.length_buckets))
    log.info("parameters: %s trainable%s, %s frozen", f"{_count(abstract['params']):,}",
             " (LoRA adapters)" if cfg.lora.enabled else "", f"{_count(abstract['frozen']):,}")
    log.info("mesh: %s over %d devices; first checkpoint at step %d (time estimated after step %d)",
             " x ".join(f"{a} {n}" for a, n in mesh_sizes.items()), math.prod(mesh_sizes.values()),
             min(total, (start // cfg.run.save_every + 1) * cfg.run.save_every), start + ETA_AFTER_STEPS)


def _log_eta(step: int, step_time: float, total: int, save_every: int) -> None:
    checkpoint = min(total, (step // save_every + 1) * save_every)
    log.info("step %d took %.3g s: at that pace the checkpoint of step %d comes in %s and the end (step %d) in %s",
             step, step_time, checkpoint, _duration((checkpoint - step) * step_time), total,
             _duration((total - step) * step_time))


def _duration(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds < 120 else (f"{seconds / 60:.0f} min" if seconds < 7200 else
                                                      f"{seconds / 3600:.1f} h")


def train(cfg, progress: bool = True, callback=None, allow_changed_settings: bool = False) -> dict:
    """Run training for a TrainConfig; returns {'losses': [...], 'export': path or None, 'state': ...,
    'steps': steps done in all, 'planned_steps': ..., 'complete': False if the data ran out first}.

    callback(step, record) is called after each step (and its checkpoint, if any) — e.g. an eval hook;
    an exception it raises stops training like an interruption would.
    """
    import jax
    import numpy as np
    from tqdm import tqdm

    from pdlm_jax import keymap
    from pdlm_jax import sharding as shd
    from pdlm_jax import trees
    from pdlm_jax.files import atomic_write
    from pdlm_jax.regions.tokenizer import Tokenizer

    from train import batches, checkpointing, init_from, monitor, step as step_lib
    from train import export_step
    from train.config import CONFIG_FILE
    from pdlm_jax.files import as_path

    mesh_sizes = check_devices(cfg, jax.device_count())
    if cfg.run.compilation_cache:
        from pdlm_jax import compilation_cache

        compilation_cache.enable(cfg.run.compilation_cache)
    model_cfg = cfg.model_config()
    out = as_path(cfg.run.output_dir)
    tokenizer_dir = init_from.training_tokenizer(cfg, model_cfg, out)
    tokenizer = Tokenizer(tokenizer_dir, base=model_cfg.is_base)
    if tokenizer.vocab_size > model_cfg.lm.vocab_size:
        raise PDLMError(f"the tokenizer has {tokenizer.vocab_size} tokens but lm.vocab_size is "
                        f"{model_cfg.lm.vocab_size}; use the checkpoint's tokenizer or a larger vocab")
    if jax.process_count() > 1 and any(len(b) > 1 for b in (cfg.data.tile_buckets, cfg.data.length_buckets,
                                                             cfg.data.answer_buckets)):
        # each host pads its own samples, so with several buckets hosts could disagree on the batch shape
        raise PDLMError("multi-host training needs one bucket per padded axis: set data.tile_buckets, "
                        "data.length_buckets and data.answer_buckets (if given) to a single value each")
    pipe = batches.build_pipeline(cfg.data, model_cfg, tokenizer, process_index=jax.process_index(),
                                  process_count=jax.process_count(), grad_accum=cfg.optim.grad_accum)
    if pipe.skipped:
        log.warning("data.on_bad_record=skip: skipped %d bad annotation records, e.g. %s", len(pipe.skipped),
                    "; ".join(pipe.skipped[:3]))
    planned = cfg.run.max_steps or pipe.steps_available
    total = planned if pipe.steps_available is None else min(planned, pipe.steps_available)
    if total < planned:
        log.warning("the data runs out after %d steps, before run.max_steps=%d: training %d steps with the lr "
                    "schedule sized for them (set data.loop: true to repeat the data)", total, planned, total)
    mesh = shd.make_mesh(mesh_sizes)
    trainer = step_lib.trainer_for(cfg, model_cfg, mesh, total, tokenizer.special.mask)
    is_main = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)
    iterator = iter(pipe.dataset)
    ckptr = checkpointing.checkpointer(out, cfg.run.keep)

    shapes = {p: jax.ShapeDtypeStruct(s, np.float32) for p, s in keymap.expected_shapes(model_cfg).items()}
    abstract = trainer.abstract_state(trees.nest(shapes), cfg.model.freeze)
    if checkpointing.latest_step(ckptr) is not None:  # before restoring: a changed mesh or batch would fail there
        _check_resume(out, cfg.to_dict(), checkpointing.latest_step(ckptr), allow_changed_settings, write=is_main)
    resumed = checkpointing.restore(ckptr, trainer.checkpointed(abstract), iterator)
    start, state = resumed or (0, None)
    if resumed is not None:
        log.info("resumed from %s at step %d", ckptr.directory, start)
    if state is None or cfg.lora.enabled:  # LoRA checkpoints hold the adapters; the base is loaded again
        params = init_from.initial_params(cfg, model_cfg, mesh)
        state = {**trainer.init_state(params, cfg.model.freeze), **(state or {})}
        del params
    if is_main:
        text = json.dumps(cfg.to_dict(), indent=2, default=list)
        if resumed is None and (out / CONFIG_FILE).exists() and (out / CONFIG_FILE).read_text() != text:
            log.warning("%s: replacing the config of an earlier run that saved no checkpoint", out / CONFIG_FILE)
        atomic_write(out / CONFIG_FILE, text)
    evaluator = (monitor.Evaluator(cfg, model_cfg, tokenizer, trainer, jax.process_index(), jax.process_count())
                 if cfg.eval.every > 0 else None)
    profiler = monitor.Profiler(cfg.run.profile_steps, out / monitor.PROFILE_DIR)

    run_log = monitor.RunLog(out, start, cfg.run.tensorboard) if is_main else None
    if is_main:
        _log_summary(cfg, pipe, start, total, abstract, mesh_sizes)
    losses = []
    step = start
    saved = start if resumed is not None else None
    bar = tqdm(total=total, initial=start, disable=not (progress and is_main), desc="train", dynamic_ncols=True)
    t_prev = time.perf_counter()
    stop, preempted = preemption.StopRequest(multi_process=jax.process_count() > 1), False
    try:
        with stop:
            while step < total:
                try:
                    batch = next(iterator)
                except StopIteration:  # not expected: steps_available counts the batches
                    log.warning("data exhausted after %d steps", step)
                    break
                profiler.before(step + 1)
                state, metrics = trainer.step(state, trainer.put_batch(batch))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                step += 1
                profiler.after(step)
                now = time.perf_counter()
                dt, t_prev = now - t_prev, now
                record = {"step": step, "loss": metrics["loss"], "lr": metrics["lr"],
                          "grad_norm": metrics["grad_norm"], "step_time": dt,
                          "tokens_per_s": metrics["tokens"] / dt, "masked_tokens": int(metrics["masked_tokens"])}
                if evaluator is not None and (step % cfg.eval.every == 0 or step == total):
                    record.update(evaluator(state, step))
                    t_prev = time.perf_counter()  # the next step_time leaves the evaluation out
                losses.append(metrics["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if is_main and step == start + ETA_AFTER_STEPS < total:  # the first step compiled; this one did not
                    _log_eta(step, dt, total, cfg.run.save_every)
                if run_log is not None:
                    run_log.write(record)
                    if step % cfg.run.log_every == 0:
                        run_log.flush()
                        bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in record.items()))
                if step % cfg.run.save_every == 0 or step == total:
                    checkpointing.save(ckptr, step, trainer.checkpointed(state), iterator, cfg.run.async_save)
                    saved = step
                if callback is not None:
                    callback(step, record)
                if step < total and stop.should_stop(step):
                    preempted = True
                    break
        if saved != step:  # stopped early: keep what was trained
            checkpointing.save(ckptr, step, trainer.checkpointed(state), iterator, cfg.run.async_save)
        ckptr.wait()
    finally:
        profiler.stop()
        bar.close()
        ckptr.close()
        if run_log is not None:
            run_log.close()
        if hasattr(iterator, "close"):  # data.workers: ends the worker processes
            iterator.close()
    if preempted:
        log.warning("stopped at step %d of %d (%s); checkpoint saved in %s", step, total,
                    stop.signalled or "preemption notice", ckptr.directory)
        return {"losses": losses, "export": None, "state": state, "steps": step, "planned_steps": planned,
                "complete": False, "preempted": True}
    complete = step >= planned
    exported = None
    if cfg.run.export:
        # a LoRA base held below float32 (lora.base) is loaded again in float32 to merge the adapters into
        float_base = export_step.base_params(cfg, model_cfg) if trainer.rounds_base else None
        params, adapters = trainer.model_params(state, float_base), (state["params"] if cfg.lora.enabled else None)
        if jax.process_count() > 1:  # every process takes part in gathering the sharded params
            from jax.experimental import multihost_utils
            params, adapters = multihost_utils.process_allgather((params, adapters), tiled=True)
        sampler = cfg.exported_sampler(model_cfg)
        provenance = {"config": cfg.to_dict(), "steps": step, "planned_steps": planned, "complete": complete,
                      "skipped_records": len(pipe.skipped), "final_loss": losses[-1:]}
        path = checkpointing.export(out / "export", model_cfg, params, tokenizer_dir, sampler, provenance)
        if adapters is not None:  # collective too
            adapter_path = checkpointing.export_adapter(out / "adapter", adapters, cfg.lora, model_cfg,
                                                        tokenizer_dir, sampler,
                                                        {**provenance, "base": cfg.model.init_from})
        if is_main:  # process 0 reports the exports
            exported = path
            log.info("exported %s", exported)
            if adapters is not None:
                log.info("exported the LoRA adapters to %s", adapter_path)
    return {"losses": losses, "export": exported, "state": state, "steps": step, "planned_steps": planned,
            "complete": complete, "preempted": False}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file operation at INFO
    try:
        from train import config as train_config

        cfg = train_config.load(args.config, args.overrides)
        _init_distributed(args)
        result = train(cfg, progress=not args.no_progress, allow_changed_settings=args.allow_changed_settings)
    except PDLMError as e:
        print(f"pdlm-train: error: {e}", file=sys.stderr)
        return 2
    if result["preempted"]:
        return preemption.EXIT_PREEMPTED
    if not result["complete"]:
        print(f"pdlm-train: stopped after {result['steps']} of run.max_steps={result['planned_steps']} steps: the "
              "data ran out (set data.loop: true to repeat it)", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
