#!/usr/bin/env bash
# Run the test suite on CPU, on one device. The tests that need several devices (sharding, multi-process
# training) run their body in a subprocess with fake CPU devices (tests/helpers.py fake_devices_env).
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
