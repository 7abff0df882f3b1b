#!/usr/bin/env bash
# Time the PerceptionDLM-8B shape on one GPU with random weights (no download): bf16, 7 tiles of 512 px
# (the reference demo photo), k = 1…6 regions, exact and prefix modes, batch 1 and 8, G = S = 32, plus the
# one-region-per-pass baseline. Rows go to $OUT/bench_gpu.json as they finish; the whole run stays under
# 8 minutes (a time budget stops starting new rows; k = 3, 1 and 6 run first).
#
#   OUT=/some/dir infer/bench_gpu.sh            # on the GPU machine
#   OUT=/tmp/smoke infer/bench_gpu.sh --smoke   # CPU smoke test: tiny widths at the same geometry
#
# If the run fails (e.g. the cuDNN attention kernel refuses a shape), the time left measures the rows again with
# XLA's attention ($OUT/bench_gpu_xla.json).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pdlm-bench}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PRESET=perceptiondlm-8b BATCH=1,8 G=32 REPEATS=1 BUDGET=380 LIMIT=460
if [[ "${1:-}" == "--smoke" ]]; then
  PRESET=tiny-512 BATCH=1,2 G=4 BUDGET=240 LIMIT=400
fi
mkdir -p "$OUT/masks"
IMAGE=tests/fixtures/demo512/image.png

# Six rectangular masks of distinct areas over the 640×476 demo photo.
"$PY" - "$IMAGE" "$OUT/masks" <<'EOF'
import sys
import numpy as np
from PIL import Image
w, h = Image.open(sys.argv[1]).size
boxes = [(0.05, 0.05, 0.60, 0.70), (0.50, 0.30, 0.95, 0.95), (0.10, 0.60, 0.45, 0.95),
         (0.65, 0.05, 0.95, 0.35), (0.30, 0.20, 0.55, 0.45), (0.02, 0.75, 0.15, 0.98)]
for i, (x0, y0, x1, y1) in enumerate(boxes):
    m = np.zeros((h, w), np.uint8)
    m[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = 255
    Image.fromarray(m).save(f"{sys.argv[2]}/mask_{i}.png")
EOF

bench() {  # $1 = attention kernel, $2 = JSON file
  timeout "$LIMIT" "$PY" -m infer.bench --random-weights "$PRESET" --image "$IMAGE" \
    --masks "$OUT"/masks/mask_{0..5}.png --num-masks 3,1,6,2,4,5 --gen-length "$G" --steps "$G" \
    --modes exact,prefix --batch "$BATCH" --repeats "$REPEATS" --dtype bfloat16 --attention "$1" \
    --time-budget "$BUDGET" --json "$OUT/$2"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
rc=0
bench auto bench_gpu.json || rc=$?
if [[ $rc != 0 && $rc != 124 && $((LIMIT - SECONDS)) -gt 90 ]]; then
  # Failed, not timed out (e.g. the cuDNN kernel refused a shape): the time that is left goes to XLA attention.
  echo "bench_gpu.sh: the default attention failed (status $rc); measuring with --attention xla" >&2
  LIMIT=$((LIMIT - SECONDS)) BUDGET=$((BUDGET - SECONDS))
  bench xla bench_gpu_xla.json
fi
