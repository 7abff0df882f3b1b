"""Where the files bundled with the library live (pdlm_jax/assets): one place, importable without JAX."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"  # the embedded region captioner trained on the synthetic shapes task (train/)
DEMO_BASE_MODEL = ASSETS / "demo_base_model"  # the embedded PerceptionDLM-Base: questions about the same scenes
DEMO_SCENE = ASSETS / "demo_scene"  # their demo picture, masks and true captions
HARDWARE = ASSETS / "hardware"  # GPU target specs and TPU topologies (pdlm_jax.hardware)
