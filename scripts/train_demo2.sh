#!/usr/bin/env bash
# The demo models of the synthetic "sentences" task, trained on this CPU with the project's recipe
# (docs/TRAINING.md, "The embedded demo model"; about 2 hours on a 2-core machine):
#   1. a PerceptionDLM-Base answering the task's questions (configs/demo2_base.yaml), composed from a vision tower
#      pretrained on the scenes (the first demo model's, 1,000 more steps of train.tower_pretraining) and a
#      random LM, on core 0;
#   2. the region captioner initialised from it (configs/demo2.yaml), both cores, and for the comparison the same
#      model from random weights for the same steps (configs/demo2_scratch.yaml, on core 1 during step 1) and
#      from Base with unpadded captions like it;
#   3. the training curves, held-out accuracy and fast-mode tables (python -m train.eval), in docs/demo2/.
# runs/demo2/export is the embedded demo model (pdlm_jax/assets/demo_model).
# Each pdlm-train runs under /usr/bin/time -v (wall and CPU time at the end of runs/*.log).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
py=.venv/bin/python
train() { /usr/bin/time -v .venv/bin/pdlm-train --no-progress --config "configs/$1.yaml" > "runs/$1.log" 2>&1; }
mkdir -p runs
$py -m train.demo tokenizer --task sentences --out configs/demo2_tokenizer
(taskset -c 1 bash -c "$(declare -f train); train demo2_scratch") &
scratch=$!
taskset -c 0 /usr/bin/time -v $py -m train.demo base-start --vision pdlm_jax/assets/demo_shapes_model \
  --config configs/demo2_base.yaml --pretrain-steps 1000 --out runs/demo2_base_start > runs/demo2_base_start.log 2>&1
taskset -c 0 bash -c "$(declare -f train); train demo2_base"
wait $scratch
train demo2
# the comparison with the scratch run, whose captions are unpadded too
/usr/bin/time -v .venv/bin/pdlm-train --no-progress --config configs/demo2.yaml data.caption_padding=0 \
  run.output_dir=runs/demo2_unpadded > runs/demo2_unpadded.log 2>&1
out=docs/demo2
cp runs/demo2_base_start/tower_pretraining.json $out/
$py -m train.demo curve --runs runs/demo2_base --labels "Base (questions)" --out $out/base_curve
$py -m train.demo curve --runs runs/demo2 runs/demo2_unpadded runs/demo2_scratch \
  --labels "from Base, padded (shipped)" "from Base, unpadded" "from random weights, unpadded" --out $out/region_curves
$py -m train.eval --checkpoint runs/demo2_base/export --scenes 200 --json $out/base_eval.json
for run in demo2 demo2_unpadded demo2_scratch; do
  $py -m train.eval --checkpoint runs/$run/export --scenes 200 --json $out/${run}_eval.json
done
$py -m train.eval --checkpoint runs/demo2/export --scenes 200 --repeats 3 \
  --modes exact,prefix,prefix:2,prefix:4,threshold:0.5,threshold:0.7,threshold:0.9,prefix+threshold:0.9 \
  --json $out/fast_modes_region.json
$py -m train.eval --checkpoint runs/demo2_base/export --scenes 50 --repeats 2 \
  --modes exact,prefix,threshold:0.5,threshold:0.7,threshold:0.9,prefix+threshold:0.9 --json $out/fast_modes_base.json
