"""Accelerators we plan for, as data: published peaks and memory, and how to get compile-only devices.

`pdlm-aot` compiles for these targets without the hardware (`jax.experimental.topologies`); benchmarks
use the same peaks for MFU and rooflines. Peak FLOP/s are dense bf16 (no sparsity); memory bandwidth is
HBM bandwidth; device memory is the published capacity of one chip (decimal GB where the vendor says GB).

Targets by name: `h100`, `h200` (one GPU), `h100x8` / `h200x8` (one host of 8 GPUs), the 24 GB cards `l4` and
`rtx4090`, and TPU topologies as JAX names them: `v5e:1x1` (one chip), `v5e:2x4`, `v5p:2x2x1`, `v5p:4x4x4`,
`v6e:2x4`, `v4:2x2x1`, ... (generation:shape).
GPU targets need the CUDA plugin and TPU targets libtpu: `pip install 'pdlm-jax[aot]'`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path

from pdlm_jax.errors import PDLMError

GPU_SPECS = Path(__file__).parent / "assets" / "hardware"

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: its published peaks and memory."""

    kind: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_bandwidth: float  # HBM bytes/s
    device_memory_bytes: int
    source: str  # where the numbers come from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHIPS = {
    # NVIDIA H100 / H200 datasheets (SXM): 989 TFLOP/s dense bf16 tensor core.
    "h100": Chip("NVIDIA H100 SXM 80GB", 989e12, 3.35e12, 80 * 10**9, "NVIDIA H100 datasheet (SXM5)"),
    "h200": Chip("NVIDIA H200 SXM 141GB", 989e12, 4.8e12, 141 * 10**9, "NVIDIA H200 datasheet (SXM)"),
    # Ada Lovelace: dense bf16 tensor FLOP/s with float32 accumulation (NVIDIA's L4 datasheet: 121 TFLOP/s,
    # 242 with sparsity; the Ada architecture whitepaper, RTX 4090: 165.2, 330.4 with sparsity).
    "l4": Chip("NVIDIA L4 24GB", 121e12, 300e9, 24 * 10**9, "NVIDIA L4 datasheet"),
    "rtx4090": Chip("NVIDIA GeForce RTX 4090 24GB", 165.2e12, 1008e9, 24 * 10**9,
                    "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090)"),
    # Google Cloud TPU system architecture pages (per chip).
    "v4": Chip("TPU v4", 275e12, 1.2e12, 32 * GiB, "Cloud TPU v4 system architecture"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GiB, "Cloud TPU v5e system architecture"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GiB, "Cloud TPU v5p system architecture"),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GiB, "Cloud TPU v6e (Trillium) system architecture"),
}

GPU_TARGETS = {"h100": ("h100", 1), "h200": ("h200", 1), "h100x8": ("h100", 8), "h200x8": ("h200", 8),
               "l4": ("l4", 1), "rtx4090": ("rtx4090", 1)}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
TPU_EXAMPLES = ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5p:2x2x1", "v5p:4x4x4", "v6e:2x4")
_TPU_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cuda" or "tpu"
    chip: Chip
    num_devices: int
    topology: str  # JAX's topology string ("1x1x8" for 8 GPUs of one host; "4x4x4" for a TPU slice)

    @property
    def gpu_spec(self) -> Path | None:
        return GPU_SPECS / f"{GPU_TARGETS[self.name][0]}.textproto" if self.platform == "cuda" else None

    def devices(self) -> list:
        """Compile-only devices of the target (no hardware needed; needs the `aot` extra installed)."""
        from jax.experimental import topologies

        quiet_tpu_environment(self)
        try:
            if self.platform == "cuda":
                topo = topologies.get_topology_desc(self.name, "cuda", target_config=self.gpu_spec.read_text(),
                                                    topology=self.topology)
            else:
                # libtpu assumes a host of 2x2 chips; a smaller slice (v5e:1x1) is one host of its own shape
                dims = [int(d) for d in self.topology.split("x")]
                host = {} if self.num_devices >= 4 else {"chips_per_host_bounds": dims + [1] * (3 - len(dims))}
                topo = topologies.get_topology_desc(topology_name=self.name, platform="tpu", **host)
        except Exception as e:  # a missing plugin surfaces as one of several jax errors
            extra = "jax-cuda13-plugin" if self.platform == "cuda" else "libtpu"
            raise PDLMError(f"cannot build compile-only devices for {self.name} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); install the aot extra "
                            f"(pip install 'pdlm-jax[aot]', which brings {extra})") from e
        devices = list(topo.devices)
        if len(devices) != self.num_devices:
            raise PDLMError(f"target {self.name}: expected {self.num_devices} devices, JAX made {len(devices)}")
        return devices


def known_targets() -> list[str]:
    return [*GPU_TARGETS, *TPU_EXAMPLES, "(any TPU topology GEN:AxB[xC] with GEN in " + ", ".join(TPU_GENERATIONS) + ")"]


def target(name: str) -> Target:
    """The target called `name`; PDLMError listing the known ones otherwise."""
    if name in GPU_TARGETS:
        chip, n = GPU_TARGETS[name]
        return Target(name, "cuda", CHIPS[chip], n, f"1x1x{n}")
    match = _TPU_NAME.match(name)
    if not match:
        raise PDLMError(f"unknown target {name!r}; known: {', '.join(known_targets())}")
    gen, shape = match.groups()
    chips = math.prod(int(d) for d in shape.split("x"))
    return Target(name, "tpu", CHIPS[gen], chips, shape)


def quiet_tpu_environment(target: Target | None = None) -> None:
    """libtpu warns about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES when the host is no TPU VM; a
    compile-only client needs neither (the topology is named explicitly), so give it the matching
    accelerator type and one local worker, and mute its logging."""
    if target is not None and target.platform == "tpu":
        gen = target.name.partition(":")[0]
        # Cloud TPU accelerator-type names: v5e counts chips ("v5litepod-8"), v4/v5p count TensorCores.
        count = target.num_devices * (2 if gen in ("v4", "v5p") else 1)
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{'v5litepod' if gen == 'v5e' else gen}-{count}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to guard: let compile-only runs overlap
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
