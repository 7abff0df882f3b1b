"""How long each command takes to print its `--help`, and whether that imported JAX.

    python scripts/bench_startup.py [--repeats 3] [--json startup.json]

Reads the commands from pyproject.toml's [project.scripts]; each row is the median wall time of --repeats fresh
interpreters calling the command's entry point with `--help` (plus `import pdlm_jax` alone). Run it from the
repository root with the package importable (the project's .venv, or PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CALL_HELP = """
import sys
from {module} import {function}
try:
    {function}(["--help"])
except SystemExit:
    pass
print("jax" in sys.modules, file=sys.stderr)
"""
IMPORT_ONLY = 'import sys, pdlm_jax\nprint("jax" in sys.modules, file=sys.stderr)'


def time_code(code: str, repeats: int) -> tuple[float, bool]:
    """Median seconds of `python -c code` over `repeats` runs, and whether the last one imported jax."""
    seconds, imported = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        seconds.append(time.perf_counter() - start)
        imported = proc.stderr.strip().splitlines()[-1] == "True"
    return statistics.median(seconds), imported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    rows = [{"command": "import pdlm_jax", **dict(zip(("seconds", "imports_jax"), time_code(IMPORT_ONLY,
                                                                                             args.repeats)))}]
    for command, target in sorted(scripts.items()):
        module, function = target.split(":")
        seconds, imported = time_code(CALL_HELP.format(module=module, function=function), args.repeats)
        rows.append({"command": f"{command} --help", "seconds": seconds, "imports_jax": imported})

    print(f"{'command':24s} {'seconds':>8s}  imports jax")
    for row in rows:
        print(f"{row['command']:24s} {row['seconds']:8.2f}  {'yes' if row['imports_jax'] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
