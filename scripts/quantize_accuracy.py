"""Accuracy of weight-only quantization on the embedded demo model: held-out scenes, exact captions
(train.eval), float32 vs int8 vs int4 at int4 group sizes 32, 64 and 128. Prints a table, writes JSON.

    python scripts/quantize_accuracy.py --scenes 100 --json /tmp/quantize_accuracy.json
"""

import argparse
import json
from pathlib import Path

from pdlm_jax import quantize
from pdlm_jax.asset_paths import DEMO_SHAPES_MODEL
from pdlm_jax.files import write_json_atomic
from train.eval import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", help="comma-separated row names to run (default: all)")
    args = ap.parse_args()
    rows = []
    for name, mode, group in [("float32", None, None), ("int8", "int8", None), ("int4 group 128", "int4", 128),
                              ("int4 group 64", "int4", 64), ("int4 group 32", "int4", 32)]:
        if args.only and name not in args.only.split(","):
            continue
        if group:
            quantize.INT4_GROUP = group
        result = evaluate(DEMO_SHAPES_MODEL, args.scenes, dtype="float32", quantize=mode, compare=mode is not None)
        rows.append({"weights": name, **{k: result.get(k, 1.0) for k in ("accuracy", "regions", "token_agreement",
                                                                        "answer_agreement")}})
        print(json.dumps(rows[-1]), flush=True)
    print("| weights | exact captions | captions equal to float32's | tokens equal to float32's |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['accuracy']:.1%} of {r['regions']} | {r['answer_agreement']:.1%} | "
              f"{r['token_agreement']:.1%} |")
    if args.json:
        write_json_atomic(args.json, rows)


if __name__ == "__main__":
    main()
