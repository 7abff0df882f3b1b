"""Training: `pdlm-train` CLI, grain data pipeline, diffusion loss, sharded train step, Orbax checkpoints."""
