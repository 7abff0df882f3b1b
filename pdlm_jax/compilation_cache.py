"""JAX's persistent compilation cache, on by default for the command-line tools (pdlm-infer, pdlm-serve).

Compiled programs are stored on disk, so a later process skips compiling the same buckets. The folder:
`--compilation-cache DIR` if given (`none` turns the cache off), else `$PDLM_COMPILATION_CACHE` (`none`: off),
else a folder already given to JAX (`JAX_COMPILATION_CACHE_DIR`), else `$XDG_CACHE_HOME/pdlm-jax/xla`
(`~/.cache/pdlm-jax/xla` without XDG_CACHE_HOME): one per user, shared by every tool.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "PDLM_COMPILATION_CACHE"
OFF = "none"


def default_dir() -> Path:
    """The per-user cache folder ($XDG_CACHE_HOME/pdlm-jax/xla or ~/.cache/pdlm-jax/xla)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pdlm-jax" / "xla"


def enable(directory: str | os.PathLike) -> None:
    """Persist compiled programs in `directory` so later processes skip compilation (JAX's persistent cache)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def configure(flag: str | os.PathLike | None = None) -> str | None:
    """Turn the cache on for this process (or leave it off); returns the folder in use, None when off.

    flag: a folder, "none", or None for the default described in the module docstring.
    """
    import jax

    if flag is None:
        flag = os.environ.get(ENV)
    if flag is None and jax.config.jax_compilation_cache_dir:  # already configured: leave JAX's settings alone
        return jax.config.jax_compilation_cache_dir
    flag = default_dir() if flag is None else flag
    if str(flag) == OFF:
        return None
    enable(flag)
    return str(flag)
