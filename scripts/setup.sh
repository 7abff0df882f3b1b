#!/usr/bin/env bash
# Create .venv and install pdlm-jax with its test extra (torch/torchvision come from the local wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
