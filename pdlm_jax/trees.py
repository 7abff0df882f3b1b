"""Parameter trees: nested dicts <-> flat {'a/b/c': leaf} maps (used by the model and by checkpoint I/O)."""

from __future__ import annotations

from typing import Any, Mapping

import jax


def nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Any) -> dict[str, Any]:
    """Any pytree with string keys (nested dicts, nnx.State) -> {'a/b/c': leaf}."""
    def key(k: Any) -> str:
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(key(k) for k in path): leaf for path, leaf in leaves}
