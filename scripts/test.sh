#!/usr/bin/env bash
# Run the test suite on CPU (the sharding tests start their own subprocesses with 8 fake devices).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
