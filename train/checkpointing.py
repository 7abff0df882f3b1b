"""Training checkpoints (Orbax CheckpointManager: async, keep-N, atomic) and the final export.

A training checkpoint holds the train state (params, frozen params, optimizer, step) and the data
iterator position, so a resumed run continues exactly; with LoRA it holds the adapters, their optimizer
state and the step, not the frozen base. The export is a pdlm-jax checkpoint directory
(pdlm_jax/checkpoint.py layout: config.json, params/, tokenizer files) that `pdlm-infer --checkpoint`
and `pdlm_jax.load` read directly; a LoRA run also exports its adapters (`export_adapter`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from pdlm_jax import checkpoint as pdlm_ckpt
from pdlm_jax import trees
from pdlm_jax.config import PDLMConfig, SamplerConfig
from pdlm_jax.errors import PDLMError
from pdlm_jax.files import as_path

CHECKPOINTS_DIR = "checkpoints"  # under run.output_dir


def manager(run_dir: str | Path, keep: int | None = None, async_save: bool = False,
            create: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of a run's `checkpoints/` folder (local, file:// or any epath URL, e.g. gs://)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=create)
    return ocp.CheckpointManager(as_path(run_dir) / CHECKPOINTS_DIR, options=options, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state: dict, iterator: grain.DatasetIterator) -> None:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=grain.checkpoint.CheckpointSave(iterator)))


def restore(mgr: ocp.CheckpointManager, abstract_state: dict, iterator: grain.DatasetIterator,
            step: int | None = None) -> tuple[int, dict] | None:
    """Restore the latest (or given) step into `abstract_state`'s shardings and the iterator; None if empty."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    try:
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                        data=grain.checkpoint.CheckpointRestore(iterator)))
    except Exception as e:  # Orbax raises assorted types for structure/shape mismatches
        raise PDLMError(f"cannot resume from {mgr.directory}/{step} ({e}); it was written by a different "
                        "config — use a new run.output_dir or remove the old checkpoints") from e
    return step, out["state"]


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
