"""Where the files bundled with the library live (pdlm_jax/assets): one place, importable without JAX."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "demo_model"  # the embedded model trained on the synthetic shapes task (train/)
DEMO_SCENE = ASSETS / "demo_scene"  # its demo picture, masks and true captions
HARDWARE = ASSETS / "hardware"  # GPU target specs and TPU topologies (pdlm_jax.hardware)
