"""Where the files bundled with the library live (pdlm_jax/assets): one place, importable without JAX."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"  # the embedded region captioner of the synthetic scenes (train/synthetic.py)
DEMO_BASE_MODEL = ASSETS / "demo_base_model"  # the embedded PerceptionDLM-Base: questions about those scenes
# the first demo model, three-word captions ("a red circle"): the LoRA and QLoRA recipes' base
DEMO_SHAPES_MODEL = ASSETS / "demo_shapes_model"
DEMO_SCENE = ASSETS / "demo_scene"  # its demo picture, masks and true captions
HARDWARE = ASSETS / "hardware"  # GPU target specs and TPU topologies (pdlm_jax.hardware)
