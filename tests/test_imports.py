"""`import pdlm_jax` and every command's `--help` start without JAX: its import (seconds on a small CPU) waits
until there is work to do. Checked by what a fresh interpreter has imported, not by timing."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The console scripts of pyproject.toml whose `--help` must not import JAX.
COMMANDS = {"pdlm-infer": "infer.cli", "pdlm-train": "train.cli", "pdlm-serve": "infer.serve",
            "pdlm-convert": "convert.cli"}

CHECK = """
import contextlib, importlib, io, sys
import pdlm_jax
assert pdlm_jax.DEMO_MODEL.is_dir() and "jax" not in sys.modules, "import pdlm_jax imported jax"
for command, module in {commands!r}.items():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            importlib.import_module(module).main(["--help"])
        except SystemExit as e:
            assert e.code == 0, (command, e.code)
    assert out.getvalue().startswith("usage: " + command), (command, out.getvalue()[:200])
    assert "jax" not in sys.modules, command + " --help imported jax"
print("ok")
"""


def test_help_and_import_pdlm_jax_do_not_import_jax():
    proc = subprocess.run([sys.executable, "-c", CHECK.format(commands=COMMANDS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_public_names_resolve_on_first_use():
    import pdlm_jax

    assert set(pdlm_jax.__all__) <= set(dir(pdlm_jax))
    for name in pdlm_jax.__all__:
        assert getattr(pdlm_jax, name) is not None
    assert pdlm_jax.load.__module__ == "pdlm_jax.api"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pdlm_jax.nope  # noqa: B018
