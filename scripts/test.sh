#!/usr/bin/env bash
# Run the test suite on CPU (8 fake devices for the sharding tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
