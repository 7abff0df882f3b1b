"""Flax NNX modules mirroring the reference: SigLIP tower, projector, LLaDA LM, PerceptionDLM."""

from pdlm_jax.modeling.layout import ParamInfo, param_layout
from pdlm_jax.modeling.llada import LLaDA
from pdlm_jax.modeling.pdm import PerceptionDLM, from_tree, load_params
from pdlm_jax.modeling.projector import Projector, pixel_shuffle
from pdlm_jax.modeling.siglip import SiglipVision

__all__ = ["LLaDA", "ParamInfo", "PerceptionDLM", "Projector", "SiglipVision", "from_tree", "load_params",
           "param_layout", "pixel_shuffle"]
