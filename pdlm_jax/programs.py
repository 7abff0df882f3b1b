"""One model's jitted program, compiled once per static bucket and kept in memory (both model kinds).

A program is a pure function `body(graphdef, state, inputs, *, bucket)`: the bucket (a frozen dataclass of
static shapes and switches) picks the executable, the inputs (a pytree of arrays of the bucket's shapes) are
its runtime values. Sequences are right-padded to a multiple of `LENGTH_MULTIPLE` (padded keys are masked
out), so inputs of similar length share an executable.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Hashable

import jax
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh

from pdlm_jax import sharding

log = logging.getLogger(__name__)

LENGTH_MULTIPLE = 64
WEIGHT_LAYOUTS = ("default", "auto")


def weight_layouts(quantize: str | None, platform: str) -> str:
    """A `Program`'s `weight_layouts` for a model quantized as `quantize` (None: float) on `platform`: "auto"
    for quantized weights on an accelerator; "default" for float weights (laid out as their matmuls read them)
    and on the CPU (jax 0.10.2's CPU client cannot place an int4 array in the packed layout its programs choose)."""
    return "auto" if quantize and platform != "cpu" else "default"


def padded_length(length: int) -> int:
    """`length` rounded up to a multiple of `LENGTH_MULTIPLE`."""
    return -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE


class Program:
    """`body` compiled ahead of time, one executable per bucket.

    `model`: an NNX module, or an already split (graphdef, state) (pdlm-aot's abstract int8 model would not
    survive a merge + split). With a `mesh`, the parameters must already be placed in their shardings
    (`api.load(mesh=...)`); inputs are split over the mesh's batch axes (`input_sharding`) and the outputs are
    replicated. `trace` wraps the tracing of each executable (qwix interception for a quantized model).

    `weight_layouts="auto"`: the compiler chooses the weights' memory layouts. XLA:GPU's int4 matmuls take the
    kernel with its contracting axis minor; given the default layout it copies every stacked int4 kernel into
    that layout before the layer loop, which costs as much memory as the weights themselves. The first compile
    chooses the layouts and the state moves into them (one copy, at load); every later bucket is compiled for
    the same layouts.
    """

    def __init__(self, name: str, body: Callable, model: nnx.Module | tuple, mesh: Mesh | None = None,
                 trace: Callable[[Callable], Callable] | None = None, weight_layouts: str = "default"):
        if weight_layouts not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight_layouts must be one of {WEIGHT_LAYOUTS}, got {weight_layouts!r}")
        self.name, self.body, self.mesh, self.trace = name, body, mesh, trace
        self.graphdef, self.state = model if isinstance(model, tuple) else nnx.split(model)
        self.weight_layouts = weight_layouts
        self._state_formats = None  # the layouts the first compile chose (weight_layouts="auto")
        self._compiled: dict[Hashable, jax.stages.Compiled] = {}

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    @property
    def executables(self) -> dict[Hashable, jax.stages.Compiled]:
        """The compiled programs so far, by bucket (e.g. for XLA's memory and cost analyses)."""
        return dict(self._compiled)

    def input_sharding(self, value) -> jax.sharding.NamedSharding:
        """An input's place on the mesh: leading batch axis over ('data', 'fsdp') where it divides, else replicated."""
        return sharding.batch_sharding(self.mesh, value.shape) if np.ndim(value) else sharding.replicated(self.mesh)

    def place(self, inputs):
        """Inputs on the mesh (`input_sharding`)."""
        if self.mesh is None:
            return inputs
        return jax.tree.map(lambda v: jax.device_put(v, self.input_sharding(v)), inputs)

    def lower(self, bucket: Hashable, inputs) -> jax.stages.Lowered:
        """The program of `bucket` traced and lowered for these inputs (abstract ones will do: `pdlm-aot` plans
        with it), not compiled."""
        in_shardings = None
        if self.weight_layouts == "auto":
            formats = self._state_formats or jax.tree.map(lambda leaf: Format(Layout.AUTO, leaf.sharding),
                                                          self.state)
            in_shardings = (formats, None)  # the inputs keep their own placement
        fn = jax.jit(functools.partial(self.body, self.graphdef, bucket=bucket), in_shardings=in_shardings,
                     out_shardings=None if self.mesh is None else sharding.replicated(self.mesh))
        lower = lambda: fn.lower(self.state, inputs)  # noqa: E731
        return self.trace(lower)() if self.trace else lower()

    def compiled(self, bucket: Hashable, inputs) -> tuple[jax.stages.Compiled, float]:
        """The executable for `bucket` and the seconds spent compiling it now (0 when cached)."""
        if bucket in self._compiled:
            return self._compiled[bucket], 0.0
        log.info("compiling the %s program for %s (once per bucket)", self.name, bucket)
        start = time.perf_counter()
        exe = self._compiled[bucket] = self.lower(bucket, inputs).compile()
        if self.weight_layouts == "auto" and self._state_formats is None:
            self._state_formats = exe.input_formats[0][0]
            self.state = jax.device_put(self.state, self._state_formats)
        return exe, time.perf_counter() - start

    def run(self, bucket: Hashable, inputs) -> tuple[object, float]:
        """(the outputs, fetched to the host; the seconds spent compiling for this call)."""
        inputs = self.place(inputs)
        exe, compile_seconds = self.compiled(bucket, inputs)
        return jax.device_get(exe(self.state, inputs)), compile_seconds
