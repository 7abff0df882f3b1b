#!/usr/bin/env bash
# The main job: set up .venv, then caption every region of the bundled demo scene with the embedded demo model
# (all regions denoised together in one jitted program). Writes demo_result.json and demo_overlay.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/pdlm-infer --demo "$@"
