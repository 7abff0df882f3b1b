"""pdlm-jax: PerceptionDLM (parallel region captioning with a diffusion LM) in JAX/Flax NNX."""

from pdlm_jax.config import PDLMConfig, SamplerConfig, preset
from pdlm_jax.errors import PDLMError
from pdlm_jax.api import DEMO_MODEL, DEMO_SCENE, load

__all__ = ["DEMO_MODEL", "DEMO_SCENE", "PDLMConfig", "SamplerConfig", "PDLMError", "load", "preset"]
__version__ = "0.1.0"
