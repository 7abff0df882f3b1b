#!/usr/bin/env bash
# Create .venv and install pdlm-jax in it (editable).
#   bash scripts/setup.sh        with the `test` and `serve` extras: the oracles (torch CPU build from local disk,
#                                transformers), the browser driver and pdlm-serve's Gradio page
#   bash scripts/setup.sh demo   only what captioning needs (no torch, no transformers)
# Nothing is installed while .venv is current: .venv/.installed records pyproject.toml's hash and what was
# installed (a test install serves the demo too). Delete .venv to start afresh. pip's output: .venv/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
case "$what" in test) spec='.[test,serve]' ;; demo) spec='.' ;; *) echo "usage: $0 [test|demo]" >&2; exit 2 ;; esac
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp=.venv/.installed
if [ -f "$stamp" ] && grep -qxE "$hash ($what|test)" "$stamp"; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
rm -f "$stamp"
echo "setup: installing pdlm-jax ($what) into .venv; pip's output goes to .venv/install.log" >&2
start=$SECONDS
if ! .venv/bin/python -m pip install -e "$spec" >.venv/install.log 2>&1; then
  tail -n 30 .venv/install.log >&2
  echo "setup: pip install failed; the whole log is in .venv/install.log" >&2
  exit 1
fi
echo "$hash $what" >"$stamp"
echo "setup: done in $((SECONDS - start)) s" >&2
