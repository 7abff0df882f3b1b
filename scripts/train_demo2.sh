#!/usr/bin/env bash
# The demo models of the synthetic "sentences" task, trained on this CPU with the project's recipe
# (docs/TRAINING.md, "Demo models of the sentences task"; about 70 minutes on a 2-core machine):
#   1. a PerceptionDLM-Base answering the task's questions (configs/demo2_base.yaml), composed from the embedded
#      demo model's vision tower and a random LM, on core 0;
#   2. the region captioner initialised from it (configs/demo2.yaml), both cores, and the same model from random
#      weights for the same steps (configs/demo2_scratch.yaml), which may run on core 1 during step 1;
#   3. the training curves, held-out accuracy and fast-mode tables (python -m train.eval), in docs/demo2/.
# Each pdlm-train runs under /usr/bin/time -v (wall and CPU time at the end of runs/*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
py=.venv/bin/python
train() { /usr/bin/time -v .venv/bin/pdlm-train --no-progress --config "configs/$1.yaml" > "runs/$1.log" 2>&1; }
mkdir -p runs
$py -m train.demo tokenizer --task sentences --out configs/demo2_tokenizer
$py -m train.demo base-start --vision pdlm_jax/assets/demo_model --config configs/demo2_base.yaml \
  --out runs/demo2_base_start
(taskset -c 1 bash -c "$(declare -f train); train demo2_scratch") &
scratch=$!
taskset -c 0 bash -c "$(declare -f train); train demo2_base"
train demo2
wait $scratch
out=docs/demo2
$py -m train.demo curve --runs runs/demo2_base --labels "Base (questions)" --out $out/base_curve
$py -m train.demo curve --runs runs/demo2 runs/demo2_scratch --labels "from the Base model" "from random weights" \
  --out $out/region_curves
$py -m train.eval --checkpoint runs/demo2_base/export --scenes 200 --json $out/base_eval.json
$py -m train.eval --checkpoint runs/demo2/export --task sentences --scenes 200 --json $out/region_from_base_eval.json
$py -m train.eval --checkpoint runs/demo2_scratch/export --task sentences --scenes 200 \
  --json $out/region_scratch_eval.json
$py -m train.eval --checkpoint runs/demo2_scratch/export --task sentences --scenes 200 --repeats 3 \
  --modes exact,prefix,prefix:2,prefix:4,threshold:0.5,threshold:0.7,threshold:0.9,prefix+threshold:0.9 \
  --json $out/fast_modes_region.json
$py -m train.eval --checkpoint runs/demo2_base/export --scenes 200 --repeats 3 \
  --modes exact,prefix,threshold:0.5,threshold:0.7,threshold:0.9,prefix+threshold:0.9 --json $out/fast_modes_base.json
