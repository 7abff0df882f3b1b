#!/usr/bin/env bash
# Compile the 8B programs for H100, H200, 8×H100, RTX 4090, L4, TPU v5e (1 and 8 chips) and v5p-64 without the
# hardware (pdlm-aot) and print the table of docs/HARDWARE.md. Installs the `aot` extra into its own venv
# (.venv-aot, ~2.7 GB on top of the base install); rows run one after another, each writing $OUT/NAME.json,
# and rows already written are kept (rerun to resume). On 2 CPU cores the whole table takes hours.
#
#   bash scripts/aot_check.sh                # OUT=/tmp/pdlm-aot
#   ROWS=h100_k6_b8_prefix bash scripts/aot_check.sh   # one row
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pdlm-aot}
VENV=${VENV:-.venv-aot}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -e ".[aot]"
mkdir -p "$OUT"
export JAX_PLATFORMS=cpu  # the host compiles; the targets are compile-only devices

INFER="--preset perceptiondlm-8b --task infer --gen-length 32 --steps 32"
TRAIN="--preset perceptiondlm-8b --task train --length 4096"
rows=()
for b in 1 8; do for k in 1 3 6; do for m in exact prefix; do
  rows+=("h100_k${k}_b${b}_${m}|--target h100 $INFER --masks $k --batch $b --mode $m"); done; done; done
for k in 1 3 6; do for m in exact prefix; do
  rows+=("h200_k${k}_b16_${m}|--target h200 $INFER --masks $k --batch 16 --mode $m"); done; done
rows+=("v5e8_k3_b8_exact|--target v5e:2x4 $INFER --masks 3 --batch 8 --mode exact --mesh tensor:8")
rows+=("v5e8_k3_b8_prefix|--target v5e:2x4 $INFER --masks 3 --batch 8 --mode prefix --mesh tensor:8")
rows+=("v5p64_train|--target v5p:4x4x4 $TRAIN --mesh fsdp:64 --batch 64")
rows+=("h100x8_train|--target h100x8 $TRAIN --mesh fsdp:8 --batch 8")
# one 24 GB GPU / one TPU v5e chip: QLoRA, int4 and int8 weights (docs/HARDWARE.md "24 GB GPUs")
QLORA="--preset perceptiondlm-8b --task train --lora-rank 16 --batch 1"
for L in 2048 4096; do for t in rtx4090 l4; do
  rows+=("${t}_lora_int4_L${L}|--target $t $QLORA --lora-base int4 --length $L"); done; done
for k in 3 6; do for m in exact prefix; do
  rows+=("rtx4090_k${k}_${m}_int4|--target rtx4090 $INFER --masks $k --mode $m --quantize int4")
  rows+=("v5e1_k${k}_${m}_int8|--target v5e:1x1 $INFER --masks $k --mode $m --quantize int8"); done; done
rows+=("v5p64_train_splash|--target v5p:4x4x4 $TRAIN --mesh fsdp:64 --batch 64 --attention splash")

status=0
for row in "${rows[@]}"; do
  name=${row%%|*} args=${row#*|}
  [[ -n "${ROWS:-}" && ",$ROWS," != *",$name,"* ]] && continue
  [ -f "$OUT/$name.json" ] && continue
  echo "== $name: pdlm-aot $args" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pdlm-aot" $args --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || { status=$?; tail -3 "$OUT/$name.log" >&2; }
done

"$VENV/bin/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
print("| target | program | memory / device (GiB) | fits | compile (s) | roofline (s) |")
print("|---|---|---|---|---|---|")
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    s, m = r["settings"], r["memory_per_device_bytes"]
    mesh = ",".join(f"{a}:{n}" for a, n in s["mesh"].items() if n > 1) or "1 device"
    if r["task"] == "infer":
        what = f"infer {s['mode']}, k={s['masks']}, batch {s['batch']} ({mesh})"
        roof = f"{r['roofline_seconds_per_image']:.3f} / image"
    else:
        what = f"train step, batch {s['batch']}, L={s['length']} ({mesh})"
        roof = f"{r['roofline_seconds_per_step']:.2f} / step"
    print(f"| {r['target']} | {what} | {m['total'] / 2**30:.1f} of {r['device_memory_bytes'] / 2**30:.1f} | "
          f"{'yes' if r['fits'] else 'NO'} | {r['compile_seconds']:.0f} | {roof} ({r['roofline_bound']}) |")
PY
exit $status
