"""pdlm-jax: PerceptionDLM (parallel region captioning with a diffusion LM) in JAX/Flax NNX.

The public names are imported on first use (PEP 562), so `import pdlm_jax` — and every command's `--help` —
does not start JAX.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "DEMO_BASE_MODEL": "pdlm_jax.asset_paths",
    "DEMO_MODEL": "pdlm_jax.asset_paths",
    "DEMO_SHAPES_MODEL": "pdlm_jax.asset_paths",
    "DEMO_SCENE": "pdlm_jax.asset_paths",
    "PDLMConfig": "pdlm_jax.config",
    "PDLMError": "pdlm_jax.errors",
    "SamplerConfig": "pdlm_jax.config",
    "load": "pdlm_jax.api",
    "preset": "pdlm_jax.config",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pdlm_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
