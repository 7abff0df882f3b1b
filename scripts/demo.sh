#!/usr/bin/env bash
# The main job: caption every region of the bundled demo scene with the embedded demo model (all regions
# denoised together in one jitted program). Installs only what captioning needs into .venv, once (no torch).
# Prints one caption per region on stdout, then the files written: result.json, overlay.png and steps.png (the
# captions after every denoising step) in out/demo/ (ignored by git), or in the folder DEMO_OUT names; then the
# embedded Base demo model's answer to a question about the same scene (answer.json). Compiled programs are kept
# in out/jax-cache, so later runs skip compiling. Other arguments go to the captioning pdlm-infer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
out="${DEMO_OUT:-out/demo}"
mkdir -p "$out"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/pdlm-infer --demo --output "$out/result.json" --visualize "$out/overlay.png" \
  --visualize-steps "$out/steps.png" --compilation-cache out/jax-cache "$@"
exec .venv/bin/pdlm-infer --demo --question "How many shapes are there?" --output "$out/answer.json" \
  --compilation-cache out/jax-cache --quiet
