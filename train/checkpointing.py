"""Training checkpoints (Orbax's training Checkpointer: async, keep-N, atomic) and the final export.

A training checkpoint holds the train state (params, frozen params, optimizer, step) and the data
iterator position, so a resumed run continues exactly; with LoRA it holds the adapters, their optimizer
state and the step, not the frozen base. The export is a pdlm-jax checkpoint directory
(pdlm_jax/checkpoint.py layout: config.json, params/, tokenizer files) that `pdlm-infer --checkpoint`
and `pdlm_jax.load` read directly; a LoRA run also exports its adapters (`export_adapter`).

Everything goes through Orbax's v1 API (`orbax.checkpoint.experimental.v1`), as pdlm_jax.checkpoint does: each
step is a folder `checkpoints/STEP` with the checkpointables `state` (a pytree) and `data` (the grain iterator,
which saves and loads itself, one file per process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from pdlm_jax import checkpoint as pdlm_ckpt
from pdlm_jax import trees
from pdlm_jax.config import PDLMConfig, SamplerConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path

CHECKPOINTS_DIR = "checkpoints"  # under run.output_dir


def checkpointer(run_dir: str | Path, keep: int | None = None) -> ocp.training.Checkpointer:
    """The Checkpointer of a run's `checkpoints/` folder (local, file:// or any epath URL, e.g. gs://), keeping
    the latest `keep` steps (None: all)."""
    keep_policy = None if keep is None else ocp.training.preservation_policies.LatestN(keep)
    return ocp.training.Checkpointer(as_path(run_dir) / CHECKPOINTS_DIR, preservation_policy=keep_policy)


def latest_step(ckptr: ocp.training.Checkpointer) -> int | None:
    return None if ckptr.latest is None else ckptr.latest.step


def save(ckptr: ocp.training.Checkpointer, step: int, state: dict, iterator: grain.DatasetIterator,
         async_save: bool = False) -> None:
    """Save `step` (the loop decides when: `force` skips the Checkpointer's own save policy); with `async_save`
    the arrays are written in the background (`ckptr.wait()` waits for them)."""
    checkpointables = {"state": state, "data": iterator}
    if async_save:
        ckptr.save_checkpointables_async(step, checkpointables, force=True)
    else:
        ckptr.save_checkpointables(step, checkpointables, force=True)


def restore(ckptr: ocp.training.Checkpointer, abstract_state: dict, iterator: grain.DatasetIterator,
            step: int | None = None) -> tuple[int, dict] | None:
    """Restore the latest (or given) step into `abstract_state`'s shardings and the iterator; None if empty."""
    step = latest_step(ckptr) if step is None else step
    if step is None:
        return None
    try:
        out = ckptr.load_checkpointables(step, {"state": abstract_state, "data": iterator})
    except Exception as e:  # Orbax raises assorted types for structure/shape mismatches
        raise PDLMError(f"cannot resume from {ckptr.directory}/{step} ({e}); it was written by a different "
                        "config — use a new run.output_dir or remove the old checkpoints") from e
    return step, out["state"]


def saved_state(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, train state as saved, on the host) of a run's latest (or given) checkpoint, without its data
    iterator: what an export of a kept step needs."""
    folder = as_path(run_dir) / CHECKPOINTS_DIR
    steps = []
    if folder.is_dir():  # the Checkpointer would make the folder
        with checkpointer(run_dir) as ckptr:
            steps = [c.step for c in ckptr.checkpoints]
            step = latest_step(ckptr) if step is None else step
            if step in steps:
                return step, ckptr.load_checkpointables(step, {"state": None})["state"]
    raise PDLMError(f"no checkpoint for step {step} in {folder} (have {steps})")


def export(out_dir: str | Path, cfg: PDLMConfig, params: dict, tokenizer_dir: str | Path,
           sampler: SamplerConfig | None = None, provenance: dict | None = None) -> Path:
    """Write `params` (full tree) as a pdlm-jax checkpoint directory (pdlm_jax.checkpoint.CheckpointWriter:
    atomic, replacing an earlier export). Collective: every process calls it."""
    with pdlm_ckpt.checkpoint_writer(out_dir, force=True) as out:
        for path, leaf in trees.flatten(params).items():
            out.params.add(path, np.asarray(jax.device_get(leaf), dtype=np.float32))
        out.write_config(cfg)
        out.copy_tokenizer(tokenizer_dir)
        if sampler is not None:
            out.write_sampler(sampler)
        return out.commit({"producer": "pdlm-train", **(provenance or {})})


def full_params(state: dict) -> dict[str, Any]:
    return {**state["params"], **state["frozen"]}


def export_adapter(out_dir: str | Path, adapters: dict, lora, cfg: PDLMConfig, tokenizer_dir: str | Path,
                   sampler: SamplerConfig, provenance: dict | None = None) -> Path:
    """Write LoRA adapters as an adapter directory (pdlm_jax.lora layout) with the training tokenizer,
    sampler.json and provenance: `pdlm-infer --checkpoint BASE --adapter DIR`. Collective, as `export`."""
    from pdlm_jax import lora as lora_lib

    return lora_lib.save_adapter(out_dir, adapters, lora, cfg, tokenizer_dir, sampler,
                                 {"producer": "pdlm-train", **(provenance or {})})
