#!/usr/bin/env bash
# Train the two embedded demo models from scratch on this CPU and export them to pdlm_jax/assets/
# (docs/TRAINING.md, "The demo models"; about an hour on a 2-core machine):
#   1. the Base demo model (questions about the synthetic scenes), configs/demo_base.yaml, both cores;
#   2. the region demo model initialised from it, configs/demo.yaml, on core 0, beside the same model trained
#      from random weights for the same steps, configs/demo_scratch.yaml, on core 1 (the comparison);
#   3. their curves and held-out accuracy (python -m train.eval) next to each export.
# Each pdlm-train runs under /usr/bin/time -v (wall and CPU time in runs/*.log). Run it again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
py=.venv/bin/python
assets=pdlm_jax/assets
train() { /usr/bin/time -v .venv/bin/pdlm-train --no-progress "$@"; }
export_to() { rm -rf "$2" && cp -r "$1/export" "$2"; }  # a run's export as an embedded model

mkdir -p runs
$py -m train.demo tokenizer --out configs/demo_tokenizer
train --config configs/demo_base.yaml > runs/demo_base.log 2>&1
export_to runs/demo_base $assets/demo_base_model
$py -m train.demo curve --runs runs/demo_base --labels "Base demo" --out $assets/demo_base_model/training_curve
$py -m train.eval --checkpoint $assets/demo_base_model --scenes 200 --json $assets/demo_base_model/evaluation.json

taskset -c 0 bash -c "$(declare -f train); train --config configs/demo.yaml" > runs/demo.log 2>&1 &
from_base=$!
taskset -c 1 bash -c "$(declare -f train); train --config configs/demo_scratch.yaml" > runs/demo_scratch.log 2>&1
wait $from_base
export_to runs/demo $assets/demo_model
$py -m train.demo curve --runs runs/demo runs/demo_scratch --labels "from the Base demo" "from scratch" \
  --out $assets/demo_model/training_curve
$py -m train.eval --checkpoint $assets/demo_model --scenes 200 --json $assets/demo_model/evaluation.json
$py -m train.demo scene --out $assets/demo_scene
