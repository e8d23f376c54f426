"""Next-token selection: greedy, temperature, top-k and top-p, reproducible with a seed.

The warpers are transformers' own (``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``),
applied in the order ``generate()`` applies them, so a preset samples from exactly the distribution that
transformers would; only the draw is ours, because it must use a seeded :class:`torch.Generator` (the
``generate()`` draw uses the global RNG).

Example::

    >>> params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=1234)
    >>> sampler = TokenSampler(params)
    >>> sampler(torch.randn(2, 1536)).shape
    torch.Size([2])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token (the paper's presets live in ``conf/infer/presets.yaml``).

    Args:
        do_sample: False = greedy (argmax; ``temperature``/``top_k``/``top_p`` are ignored).
        temperature: divides the logits before sampling (> 0).
        top_k: keep the k most likely tokens (None or 0 = off).
        top_p: nucleus sampling mass (None or 1.0 = off).
        guidance_scale: CFG lambda of eq. (3); 1.0 = no guidance (no unconditional rows are decoded).
        max_new_tokens: hard cap on generated tokens per row.
        seed: seeds the sampling generator; the same seed, prompts and model give the same tokens.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=false for greedy decoding")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or null = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale (CFG lambda) must be >= 0, got {self.guidance_scale}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def replace(self, **changes) -> "SamplingParams":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise KeyError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {[f.name for f in fields(self)]}")
        return SamplingParams(**{**asdict(self), **changes})


class TokenSampler:
    """Turns final (guided, constrained) logits ``[B, V]`` into next tokens ``[B]``.

    One instance per generation call: it owns the seeded generator, so two calls with the same seed draw
    the same numbers. Masked logits must already be ``-inf``; the warpers keep them there.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.warpers = []
        if params.do_sample:
            if params.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.warpers.append(TopKLogitsWarper(top_k=int(params.top_k)))
            if params.top_p is not None and params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=float(params.top_p)))
        self._generator: torch.Generator | None = None

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.params.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(int(self.params.seed))
        return self._generator

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits the draw is made from (temperature, top-k, top-p applied)."""
        for warper in self.warpers:
            logits = warper(None, logits)
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.params.do_sample:
            return logits.argmax(dim=-1)
        probs = torch.softmax(self.warp(logits.float()), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self._generator_for(probs.device)).squeeze(-1)
