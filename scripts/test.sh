#!/usr/bin/env bash
# Check the import layers (pyproject.toml [tool.importlinter], docs/ARCHITECTURE.md), then run the test suite on
# CPU in PDLM_TEST_WORKERS pytest-xdist workers (default 2: this project's machines have 2 cores; each worker
# takes whole test files, so a module's fixtures are built once) and list its 30 slowest tests. The tests that
# need several devices (sharding, multi-process training) run their body in a subprocess with fake CPU devices
# (tests/helpers.py fake_devices_env). Compiled programs are kept in .pytest_cache/jax-compilation-cache
# (tests/conftest.py), shared by the workers; `--cache-clear` starts cold.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
.venv/bin/lint-imports --no-logo
exec .venv/bin/python -m pytest -q --durations=30 -n "${PDLM_TEST_WORKERS:-2}" --dist loadfile "$@"
