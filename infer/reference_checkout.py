"""Importing the PyTorch reference (MSALab-PKU/PerceptionDLM) from a checkout given on the command line.

The oracle and benchmark scripts (`infer.bench_reference`, `infer.base_reference`) run the reference's own
classes and demo; its code is never copied here.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import types
from pathlib import Path

from pdlm_jax.checkpoint import TOKENIZER_FILES
from pdlm_jax.errors import PDLMError


def import_package(repo: Path, package: str) -> types.ModuleType:
    """The reference's model package (`pdmllm`, or `dmllm` for Base) from `smallvlm/models` of the checkout
    (a namespace package, so the repository's own heavy `__init__` is not run), with its LLaDA config
    registered with transformers' AutoConfig as the reference's loading code expects."""
    models = Path(repo) / "smallvlm" / "models"
    if not (models / package).is_dir():
        raise PDLMError(f"--reference-repo {repo}: no smallvlm/models/{package}; give a checkout of "
                        "MSALab-PKU/PerceptionDLM")
    if str(models) not in sys.path:
        sys.path.insert(0, str(models))
    llada = importlib.import_module(f"{package}.configuration_llada")
    from transformers import AutoConfig

    try:
        AutoConfig.register("llada", llada.LLaDAConfig)
    except ValueError:  # already registered
        pass
    return importlib.import_module(package)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer and processor files (pdlm_jax.checkpoint.TOKENIZER_FILES) that `src` holds into a
    reference-format checkpoint folder `dst` made by these scripts."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def load_demo(repo: Path, script: str, name: str) -> types.ModuleType:
    """The checkout's `demo/<script>` loaded as module `name` (its helpers: prompt building, parsing)."""
    spec = importlib.util.spec_from_file_location(name, Path(repo) / "demo" / script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo
