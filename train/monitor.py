"""Watching a run: log.jsonl, TensorBoard events, periodic held-out evaluation and a profiler switch.

* `RunLog`: one JSON line per step in `output_dir/log.jsonl` (trimmed to the restored step on resume) and
  the same scalars as TensorBoard events in `output_dir/tensorboard` (tensorboardX).
* `Evaluator`: every `eval.every` steps, the diffusion loss on held-out samples (fixed noise, so successive
  evaluations compare like with like) and the exact-caption accuracy of the current weights through the
  inference path (`RegionCaptioner.caption_regions`, as `pdlm-infer`).
* `Profiler`: a `jax.profiler` trace of steps `run.profile_steps` = [first, last] into `output_dir/profile`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import numpy as np

from pdlm_jax.errors import PDLMError
from pdlm_jax.files import atomic_write
from train import tensorboard_writer

log = logging.getLogger("pdlm-train")

TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
        return None


class RunLog:
    """log.jsonl (+ TensorBoard) of the main process. Local files are appended line by line; on an object
    store (gs://...), where files cannot be appended to, log.jsonl is rewritten at every `flush`."""

    def __init__(self, out, start_step: int, tensorboard: bool):
        self.path = out / "log.jsonl"
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.lines = [ln for ln in lines if (s := _step_of(ln)) is not None and s <= start_step]
        if len(self.lines) != len(lines):
            log.info("log.jsonl: dropped %d lines after the restored step %d", len(lines) - len(self.lines),
                     start_step)
        atomic_write(self.path, "".join(ln + "\n" for ln in self.lines))
        self.remote = "://" in str(self.path)
        self.file = None if self.remote else open(self.path, "a")
        # purge_step: TensorBoard drops the events an interrupted run wrote after the restored step
        purge_step = start_step + 1 if start_step else None
        self.writer = (tensorboard_writer.summary_writer(out / TENSORBOARD_DIR, purge_step=purge_step)
                       if tensorboard else None)

    def write(self, record: dict) -> None:
        line = json.dumps(record)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        else:
            self.lines.append(line)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    tag = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else "train/" + key
                    self.writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        if self.remote:
            atomic_write(self.path, "".join(ln + "\n" for ln in self.lines))
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class Profiler:
    """Traces steps first..last (1-based, inclusive) with jax.profiler (view in TensorBoard / XProf)."""

    def __init__(self, steps: tuple[int, ...], logdir):
        self.first, self.last = steps if steps else (0, -1)
        self.logdir, self.active = logdir, False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int) -> None:
        if self.active and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d..%d written to %s", self.first, self.last, self.logdir)


class Evaluator:
    """Held-out loss and exact-caption accuracy of the weights being trained (see the module docstring)."""

    def __init__(self, cfg, model_cfg, tokenizer, trainer, process_index: int = 0, process_count: int = 1):
        from train import batches, eval as train_eval, sources

        e = cfg.eval
        self.cfg, self.model_cfg, self.tokenizer, self.trainer = cfg, model_cfg, tokenizer, trainer
        self.data_cfg = dataclasses.replace(
            cfg.data, annotations=tuple(e.annotations), synthetic_scenes=e.synthetic_scenes,
            synthetic_seed=train_eval.HELD_OUT_SEED, weights=(), batch_size=e.batch_size, epochs=1, loop=False,
            on_bad_record="error", workers=0)
        self.pipe = batches.build_pipeline(self.data_cfg, model_cfg, tokenizer, process_index=process_index,
                                           process_count=process_count, batch_name="eval.batch_size")
        # caption with the generation settings the exported model will have, unless eval.gen_length / steps
        exported = cfg.sampler(model_cfg)
        gen_length = e.gen_length or exported.gen_length
        self.sampler = {"gen_length": gen_length, "steps": e.steps or (gen_length if e.gen_length else exported.steps)}
        # captioning runs the inference program on one process's view of the weights
        self.records = []
        if e.max_records > 0 and model_cfg.is_base:
            log.info("eval: a PerceptionDLM-Base model reports the held-out loss (captions need a region model)")
        elif e.max_records > 0 and process_count == 1:
            for source in sources.make_sources(self.data_cfg):
                self.records += [source[i] for i in range(min(len(source), e.max_records - len(self.records)))]
        elif e.max_records > 0:
            log.warning("eval: exact-caption accuracy runs on a single process only; multi-host runs report the loss")
        self._loss_fn = None
        self._captioner = None

    def _loss(self, state: dict) -> float:
        from flax import nnx

        from pdlm_jax import sharding as shd
        from train import step as step_lib

        t = self.trainer
        if self._loss_fn is None:
            # LoRA runs evaluate the merged weights with the plain model (t.graphdef has the adapters)
            graphdef = (nnx.split(step_lib.build_model(t.cfg, self.cfg.model.dtype, abstract=True))[0]
                        if t.lora.enabled else t.graphdef)

            def loss(params, batch, key):
                model = nnx.merge(graphdef, params)
                return step_lib.batch_loss(model, batch, key, t.mask_id, t.noise_t_min, t.mesh)[0]

            self._loss_fn = jax.jit(loss, out_shardings=shd.replicated(t.mesh))
        params = t.model_params(state)
        key = jax.random.key(self.cfg.run.seed + 1)  # the same noise at every evaluation
        losses = [float(self._loss_fn(params, t.put_batch(batch), jax.random.fold_in(key, i)))
                  for i, batch in enumerate(iter(self.pipe.dataset))]
        return float(np.mean(losses))

    def _accuracy(self, state: dict) -> tuple[float, int]:
        from flax import nnx

        from pdlm_jax.api import RegionCaptioner, attention_implementation
        from pdlm_jax.config import DTYPES
        from pdlm_jax.modeling.pdm import from_tree
        from train.eval import judge

        dtype = DTYPES[self.cfg.model.dtype]
        model = from_tree(self.model_cfg, self.trainer.model_params(state), dtype=dtype,
                          attention_implementation=attention_implementation("auto", dtype))
        if self._captioner is None:
            self._captioner = RegionCaptioner(self.model_cfg, model, self.tokenizer, self.trainer.mesh, self.sampler)
        else:  # same shapes: the compiled caption programs are reused with the new weights
            self._captioner.program.state = nnx.split(model)[1]
        oks = [ok for r in self.records for ok in judge(self._captioner, r.image, r.masks, r.captions)[1]]
        return sum(oks) / max(len(oks), 1), len(oks)

    def __call__(self, state: dict, step: int) -> dict:
        start = time.perf_counter()
        library_log = logging.getLogger("pdlm_jax")  # the inference path logs every image it captions
        level = library_log.level
        library_log.setLevel(logging.WARNING)
        try:
            out = {"eval_loss": self._loss(state)}
            if self.records:
                out["eval_accuracy"], out["eval_regions"] = self._accuracy(state)
        except PDLMError as e:
            raise PDLMError(f"evaluation failed: {e}") from e
        finally:
            library_log.setLevel(level)
        out["eval_seconds"] = time.perf_counter() - start
        accuracy = (f", exact captions {out['eval_accuracy']:.1%} of {out['eval_regions']} regions (gen_length "
                    f"{self.sampler['gen_length']}, steps {self.sampler['steps']})" if self.records else "")
        log.info("eval at step %d: loss %.4g%s, %.1f s", step, out["eval_loss"], accuracy, out["eval_seconds"])
        return out
