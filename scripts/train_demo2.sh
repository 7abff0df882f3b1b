#!/usr/bin/env bash
# The demo models of the synthetic "sentences" task, trained on this CPU with the project's recipe
# (docs/TRAINING.md, "The embedded demo models"; about 1 h 30 min on a 2-core machine):
#   1. the Base demo model (configs/demo2_base.yaml), composed from a vision tower and projector pretrained on the
#      scenes (train.tower_pretraining, 3,000 steps) and a random LM, on core 1; meanwhile, for the comparison, the
#      region captioner from random weights (configs/demo2_scratch.yaml) on core 0;
#   2. the region captioner initialised from the Base model (configs/demo2.yaml) on core 1, while core 0 scores
#      the Base model (held-out answers, fast-mode table);
#   3. the region captioners' curves, held-out accuracy and fast-mode table (python -m train.eval), in docs/demo2/.
# runs/demo2_base/export is the Base demo model (pdlm_jax/assets/demo_base_model), runs/demo2/export the embedded
# demo model (pdlm_jax/assets/demo_model). Each step runs under /usr/bin/time -v (wall and CPU time at the end of
# runs/*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
py=.venv/bin/python
train() { /usr/bin/time -v .venv/bin/pdlm-train --no-progress --config "configs/$1.yaml" > "runs/$1.log" 2>&1; }
mkdir -p runs
$py -m train.demo tokenizer --task sentences --out configs/demo2_tokenizer
(taskset -c 0 bash -c "$(declare -f train); train demo2_scratch") &
scratch=$!
taskset -c 1 /usr/bin/time -v $py -m train.demo base-start --config configs/demo2_base.yaml --pretrain-steps 3000 \
  --out runs/demo2_base_start > runs/demo2_base_start.log 2>&1
taskset -c 1 bash -c "$(declare -f train); train demo2_base"
wait $scratch
(taskset -c 1 bash -c "$(declare -f train); train demo2") &
region=$!
out=docs/demo2
cp runs/demo2_base_start/tower_pretraining.json $out/
taskset -c 0 $py -m train.demo curve --runs runs/demo2_base --labels "Base (five questions a sample)" \
  --out $out/base_curve
taskset -c 0 $py -m train.eval --checkpoint runs/demo2_base/export --scenes 200 --json $out/base_eval.json
taskset -c 0 $py -m train.eval --checkpoint runs/demo2_base/export --scenes 200 --repeats 3 \
  --modes exact,prefix,threshold:0.5,threshold:0.7,threshold:0.9,prefix+threshold:0.9 --json $out/fast_modes_base.json
wait $region
$py -m train.demo curve --runs runs/demo2 runs/demo2_scratch --labels "from Base (shipped)" "from random weights" \
  --out $out/region_curves
for run in demo2 demo2_scratch; do
  $py -m train.eval --checkpoint runs/$run/export --scenes 200 --json $out/${run}_eval.json
done
$py -m train.eval --checkpoint runs/demo2/export --scenes 200 --repeats 3 \
  --modes exact,prefix,prefix:2,prefix:4,threshold:0.5,threshold:0.7,threshold:0.9,prefix+threshold:0.9 \
  --json $out/fast_modes_region.json
