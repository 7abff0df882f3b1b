"""How a model generates: `GenerationSettings`, the one place their defaults are resolved and checked.

    settings = resolve(read_sampler(checkpoint), base=False, gen_length=16)  # None = the stored/default value

Both model kinds take the same settings: `gen_length` answer positions (per region for the region model),
`steps` denoising forwards, the sampler `Mode` (exact, or the opt-in prefix cache and threshold unmasking),
`temperature` / `top_p` / `seed` (region model; PerceptionDLM-Base is greedy) and `block_length` (the Base
block sampler; None for the region model). The defaults: a checkpoint's sampler.json (`gen_length`, `steps`,
`block_length`), else the reference's (32/32 for regions, as its README; 128/128/128 for Base, as its demo).

This module imports no JAX: the commands check their flags with it before a model loads.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping

from pdlm_jax.config import SamplerConfig
from pdlm_jax.errors import PDLMError

_NEVER = 2**30  # prefix refresh period meaning "only at step 0"


@dataclasses.dataclass(frozen=True)
class Mode:
    """How the denoising loop runs; the default is the reference's exact sampler.

    cache: "none" (full forward every step) or "prefix" (the prompt's keys/values are reused; see `pipeline`
    and `answering`); refresh: recompute them every `refresh` steps (None = only at step 0; 1 = every step,
    i.e. exact; region model only). unmask: "remask" (the reference's schedule) or "threshold" (commit every
    slot with p > `threshold`, at least one per caption block per step).
    """

    cache: str = "none"
    refresh: int | None = None
    unmask: str = "remask"
    threshold: float = 0.9

    def __post_init__(self):
        if self.cache not in ("none", "prefix"):
            raise PDLMError(f"cache mode must be 'none' or 'prefix[:R]', got {self.cache!r}")
        if self.unmask not in ("remask", "threshold"):
            raise PDLMError(f"unmask mode must be 'remask' or 'threshold:TAU', got {self.unmask!r}")
        if self.refresh is not None and self.refresh < 1:
            raise PDLMError(f"prefix refresh period must be a positive number of steps, got {self.refresh}")
        if not 0 < self.threshold < 1:
            raise PDLMError(f"unmask threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def parse(cls, cache: str = "none", unmask: str = "remask") -> "Mode":
        """From the CLI spellings: cache 'none' | 'prefix' | 'prefix:R'; unmask 'remask' | 'threshold:TAU'."""
        cache_name, _, refresh = str(cache).partition(":")
        unmask_name, _, tau = str(unmask).partition(":")
        try:
            return cls(cache=cache_name, refresh=int(refresh) if refresh else None, unmask=unmask_name,
                       threshold=float(tau) if tau else cls.threshold)
        except ValueError:
            raise PDLMError(f"cannot parse cache {cache!r} / unmask {unmask!r}; use e.g. 'prefix:4' and "
                            "'threshold:0.9'") from None

    @classmethod
    def from_name(cls, name: str) -> "Mode":
        """The inverse of `name`: 'exact', or 'prefix[:R]' and/or 'threshold[:TAU]' joined by '+'."""
        parts = {}
        for part in ([] if name == "exact" else str(name).split("+")):
            kind = part.partition(":")[0]
            if kind not in ("prefix", "threshold") or kind in parts:
                raise PDLMError(f"{name!r} is not a sampler mode: use exact, prefix[:R], threshold[:TAU] or "
                                "prefix[:R]+threshold[:TAU]")
            parts[kind] = part
        return cls.parse(parts.get("prefix", "none"), parts.get("threshold", "remask"))

    @property
    def arguments(self) -> dict[str, str]:
        """The `cache` and `unmask` spellings of this mode (the CLI flags; `parse` reads them)."""
        return {"cache": "none" if self.cache == "none" else "prefix" + (f":{self.refresh}" if self.refresh else ""),
                "unmask": "remask" if self.unmask == "remask" else f"threshold:{self.threshold!r}"}

    @property
    def static(self) -> "Mode":
        """What a compiled program depends on: the kinds of cache and unmasking. The refresh period and the
        threshold are runtime inputs, so they are left at their defaults."""
        return Mode(cache=self.cache, unmask=self.unmask)

    @property
    def refresh_period(self) -> int:
        """The refresh period as the program takes it (a huge one for "only at step 0")."""
        return self.refresh or _NEVER

    @property
    def exact(self) -> bool:
        return self.cache == "none" and self.unmask == "remask"

    def forward_split(self, forwards: int) -> tuple[int, int]:
        """(full forwards, caption-rows-only forwards) of a region pass that ran `forwards` forwards."""
        if self.cache != "prefix":
            return forwards, 0
        full = -(-forwards // self.refresh) if self.refresh else 1
        return full, forwards - full

    @property
    def name(self) -> str:
        parts = []
        if self.cache == "prefix":
            parts.append("prefix" + (f":{self.refresh}" if self.refresh else ""))
        if self.unmask == "threshold":
            parts.append(f"threshold:{self.threshold:g}")
        return "+".join(parts) or "exact"


EXACT = Mode()


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The sampler settings of one call, checked when built (PDLMError). Build them with `resolve`."""

    gen_length: int
    steps: int
    block_length: int | None = None  # PerceptionDLM-Base's block sampler; None for the region model
    mode: Mode = EXACT
    temperature: float = 0.0  # 0 = greedy, the reference's setting
    top_p: float = 1.0  # nucleus filtering when sampling (the reference accepts and ignores it)
    seed: int = 0  # of sampling; region pass c of an image uses seed + c

    def __post_init__(self):
        for name in ("gen_length", "steps", "seed") + (("block_length",) if self.block_length is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < (name != "seed"):
                what = "a non-negative" if name == "seed" else "a positive"
                raise PDLMError(f"{name} must be {what} integer, got {value!r}")
        if not isinstance(self.mode, Mode):
            raise PDLMError(f"mode must be a Mode (Mode.from_name('prefix:4')), got {self.mode!r}")
        if not self.temperature >= 0:
            raise PDLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise PDLMError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def base(self) -> bool:
        """Settings of PerceptionDLM-Base's block sampler."""
        return self.block_length is not None

    def check_regions(self, num_masks: int, prompt_numbers: int) -> None:
        """steps <= k·gen_length for the smallest pass of `num_masks` regions (masks beyond prompt_numbers are
        captioned in chunks, the last one holding the remainder)."""
        if not num_masks:
            return
        smallest = num_masks if num_masks <= prompt_numbers else (num_masks % prompt_numbers or prompt_numbers)
        if self.steps > smallest * self.gen_length:
            raise PDLMError(f"steps={self.steps} exceeds the {smallest * self.gen_length} caption slots of a "
                            f"{smallest}-region pass (gen_length={self.gen_length}); use steps <= "
                            f"{smallest * self.gen_length}")

    def record(self) -> dict:
        """The settings as results and summaries report them."""
        if self.base:
            return {"gen_length": self.gen_length, "block_length": self.block_length, "steps": self.steps,
                    "mode": self.mode.name}
        return {"gen_length": self.gen_length, "steps": self.steps, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed, "mode": self.mode.name}


REGION_DEFAULTS = GenerationSettings(gen_length=SamplerConfig.gen_length, steps=SamplerConfig.steps)
BASE_DEFAULTS = GenerationSettings(gen_length=128, steps=128, block_length=128)  # the reference demo's settings
STORED = ("gen_length", "steps", "block_length")  # what a checkpoint's sampler.json sets
OVERRIDES = STORED + ("temperature", "top_p", "seed", "mode", "cache", "unmask")  # what a call may set


def resolve(stored: Mapping | GenerationSettings | None = None, base: bool = False,
            **overrides) -> GenerationSettings:
    """The settings of a call: `overrides` (any of `OVERRIDES`; None = not given) over `stored` (a checkpoint's
    sampler.json values, or settings resolved before) over the kind's defaults. `base`: PerceptionDLM-Base.

    `mode` is a `Mode` or its name ("prefix:4+threshold:0.9"); `cache` / `unmask` are its CLI spellings. A Base
    block_length neither given nor stored is gen_length (one block, as the reference demo), and so is a stored
    one that does not divide gen_length. PDLMError for settings the kind cannot run.
    """
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; known: {', '.join(OVERRIDES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(stored, GenerationSettings):
        stored = {f.name: getattr(stored, f.name) for f in dataclasses.fields(stored)}
    else:
        stored = {k: v for k, v in (stored or {}).items() if k in STORED}
    stored = {k: v for k, v in stored.items() if v is not None}
    defaults = BASE_DEFAULTS if base else REGION_DEFAULTS
    values = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)} | stored
    mode = given.pop("mode", values["mode"])
    mode = Mode.from_name(mode) if isinstance(mode, str) else mode
    if "cache" in given or "unmask" in given:
        spelled = mode.arguments
        mode = Mode.parse(given.pop("cache", spelled["cache"]), given.pop("unmask", spelled["unmask"]))
    values |= given | {"mode": mode}
    if base:
        gen_length, block_length = values["gen_length"], values["block_length"]
        if "block_length" not in given and ("block_length" not in stored or (
                isinstance(gen_length, int) and isinstance(block_length, int) and gen_length % block_length)):
            values["block_length"] = gen_length
    elif values["block_length"] is not None:
        raise PDLMError("block_length applies to PerceptionDLM-Base checkpoints (block diffusion) only")
    settings = GenerationSettings(**values)
    if base:
        _check_base(settings)
    return settings


def _check_base(settings: GenerationSettings) -> None:
    """What the Base block sampler cannot run."""
    from pdlm_jax.block_sampling import block_schedule

    block_schedule(settings.gen_length, settings.block_length, settings.steps)  # PDLMError where they do not divide
    if settings.mode.refresh is not None:
        raise PDLMError("PerceptionDLM-Base's prefix cache refreshes at the first step of every block: give cache "
                        f"'prefix' without a period, not {settings.mode.arguments['cache']!r}")
    if settings.temperature != 0:
        raise PDLMError("PerceptionDLM-Base answering is greedy (the reference's sampler): temperature must be 0")


def for_checkpoint(checkpoint, adapter=None, **overrides) -> GenerationSettings:
    """`resolve` against a checkpoint's sampler.json (its adapter's, if that has one), reading only the config
    and that file: the commands check their settings with it before any weight loads."""
    from pdlm_jax.checkpoint import load_config, read_sampler

    return resolve(read_sampler(sampler_source(checkpoint, adapter)), load_config(checkpoint).is_base, **overrides)


def sampler_source(checkpoint, adapter=None):
    """Where the generation defaults come from: the adapter, if it has a sampler.json, else the checkpoint."""
    from pdlm_jax.checkpoint import SAMPLER_FILE
    from pdlm_jax.files import local_directory

    if adapter is not None and (local_directory(adapter, "adapter") / SAMPLER_FILE).exists():
        return adapter
    return checkpoint
