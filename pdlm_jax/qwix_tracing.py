"""Running our NNX modules under qwix: qwix matches its rules against a `qwix_path` on each module and
intercepts the ops of whatever is traced under a provider. LoRA (pdlm_jax.lora) and weight quantization
(pdlm_jax.quantize) both build on this. The one use of qwix's private API is here (`ptq_weight`)."""

from __future__ import annotations

import functools
from typing import Callable

from flax import nnx


def module_path(path: tuple) -> str:
    return "/".join(map(str, path))


def tag_paths(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """Set `qwix_path` on every module (qwix matches its rules' module_path against it; a module merged
    from a graphdef keeps it); returns [(path, module)]."""
    out = []
    for path, module in nnx.iter_modules(model):
        module.qwix_path = path
        out.append((module_path(path), module))
    return out


class _Call(nnx.Module):
    """A module whose call runs any function: qwix intercepts the ops of everything traced inside it."""

    def __call__(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def under(qwix_provider) -> Callable[[Callable], Callable]:
    """`under(p)(fn)` runs fn with qwix provider p active (p's rules apply to the modules fn calls; the
    modules need a `qwix_path`, see `add_adapters`). Use it around tracing: the jitted code keeps the
    intercepted ops."""
    import qwix

    runner = qwix.quantize_model(_Call(), qwix_provider, skip_nnx_init=True)
    return lambda fn: functools.wraps(fn)(functools.partial(runner, fn))


def ptq_weight(q, how: dict):
    """The kernel `q` that `qwix.quantize(kernel, **how)` made as the weight qwix's PtqProvider multiplies with
    (`q` together with how it was quantized)."""
    # qwix exports no constructor of that weight (WithAux and its HowToQuantize), only quantize-on-first-call
    from qwix._src.providers import ptq

    return ptq.WithAux(q, ptq.qarray.HowToQuantize(**how))
