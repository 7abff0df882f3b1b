#!/usr/bin/env bash
# What the frozen base's precision costs a LoRA fine-tune (docs/TRAINING.md, "QLoRA: accuracy by lora.base"):
# configs/finetune_demo_lora.yaml (teach the demo model "purple") once per lora.base, each adapter judged by
# python -m train.eval on held-out five-colour scenes and on the original four-colour task, applied to the float
# base (what the export and `pdlm-infer --adapter` do) and, for int8/int4, to the quantized base it trained
# against. About 25 CPU-minutes (each fine-tune 3 min of CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
py=.venv/bin/python
out=docs/qlora
mkdir -p runs "$out"
[ -f runs/purple_data/annotations.json ] ||
  $py -m train.synthetic --out runs/purple_data --scenes 3000 --colors red,green,blue,yellow,purple
[ -f runs/purple_eval/annotations.json ] ||
  $py -m train.synthetic --out runs/purple_eval --scenes 50 --colors purple --seed 1000003
for base in f32 bf16 int8 int4; do
  run=runs/demo_lora_$base
  /usr/bin/time -v .venv/bin/pdlm-train --no-progress --config configs/finetune_demo_lora.yaml \
    lora.base=$base run.output_dir=$run > "$run.log" 2>&1
  $py -m train.eval --checkpoint pdlm_jax/assets/demo_shapes_model --adapter $run/adapter --colors red,green,blue,yellow,purple --scenes 100 \
    --json "$out/${base}_five_colours.json"
  $py -m train.eval --checkpoint pdlm_jax/assets/demo_shapes_model --adapter $run/adapter --scenes 100 --json "$out/${base}_original_task.json"
done
# a quantized base's adapter on the quantized weights it trained against (pdlm-infer --quantize Q --adapter)
for q in int8 int4; do
  $py -m train.eval --checkpoint pdlm_jax/assets/demo_shapes_model --adapter runs/demo_lora_$q/adapter --quantize $q --colors red,green,blue,yellow,purple \
    --scenes 100 --json "$out/${q}_five_colours_on_${q}_weights.json"
done
