"""What every loaded model has, whatever it does: `ModelHandle`.

`pdlm_jax.load` returns a `RegionCaptioner` (`caption_regions`, `caption_batch`) or a `QuestionAnswerer`
(`answer`), both `ModelHandle`s: the config, the tokenizer, the request limits, the checkpoint's generation
defaults and their resolution (`settings`), and the compiled program (`program`, one executable per bucket).
"""

from __future__ import annotations

from typing import Mapping

from jax.sharding import Mesh

from pdlm_jax import generation
from pdlm_jax.config import PDLMConfig
from pdlm_jax.generation import GenerationSettings
from pdlm_jax.limits import Limits
from pdlm_jax.programs import Program
from pdlm_jax.regions.tokenizer import Tokenizer


class ModelHandle:
    """A loaded model, its tokenizer and its compiled program.

    `sampler`: the checkpoint's sampler.json values (the generation defaults; see `generation.resolve`).
    `limits` (`pdlm_jax.limits.Limits`): the positions, masks and pixels one call may use; replace it
    (`dataclasses.replace`) to change the mask or pixel limits.
    """

    def __init__(self, cfg: PDLMConfig, tokenizer: Tokenizer, program: Program, mesh: Mesh | None = None,
                 sampler: Mapping | None = None, limits: Limits | None = None):
        self.cfg, self.tokenizer, self.program, self.mesh = cfg, tokenizer, program, mesh
        self.limits = limits or Limits(cfg, tokenizer)
        self.sampler = dict(sampler or {})
        self.defaults = self.settings()  # PDLMError here for a sampler.json this model cannot run

    def settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """The settings of a call: `overrides` (`generation.OVERRIDES`; None = not given) over `settings`, else
        over this checkpoint's defaults."""
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise TypeError(f"settings must be GenerationSettings, got {settings!r}; give gen_length, steps, ... "
                            "as keywords (gen_length=8, steps=8)")
        return generation.resolve(self.sampler if settings is None else settings, self.cfg.is_base, **overrides)

    @property
    def num_compiled(self) -> int:
        """Executables compiled so far (one per bucket)."""
        return self.program.num_compiled
