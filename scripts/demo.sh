#!/usr/bin/env bash
# The main job: caption every region of the bundled demo scene with the embedded demo model (all regions
# denoised together in one jitted program), then ask the embedded Base demo model a question about the scene.
# Installs only what inference needs into .venv, once (no torch). Prints one caption per region on stdout, the
# question and its answer on the next line, then the files written: result.json, overlay.png, steps.png (the
# captions at every denoising step) and answer.json in out/demo/ (ignored by git), or in the folder DEMO_OUT
# names. Compiled programs are kept in out/jax-cache, so later runs skip compiling. Other arguments go to the
# captioning pdlm-infer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
out="${DEMO_OUT:-out/demo}"
mkdir -p "$out"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
captions=$(.venv/bin/pdlm-infer --demo --output "$out/result.json" --visualize "$out/overlay.png" \
  --visualize-steps "$out/steps.png" --compilation-cache out/jax-cache "$@")
answer=$(.venv/bin/pdlm-infer --demo --question "How many shapes are there?" --output "$out/answer.json" \
  --compilation-cache out/jax-cache --quiet)
grep '^region ' <<<"$captions"
grep -v '^wrote ' <<<"$answer"
grep '^wrote ' <<<"$captions"
grep '^wrote ' <<<"$answer"
