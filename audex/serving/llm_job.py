"""What the LLM step runs and answers: an :class:`LlmJob` (one user request: prompt ids, preset, output grammar, the
CFG twin's prompt) and its :class:`JobEvent` s, whichever executor runs it (:mod:`audex.serving.guided_executor`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from audex.inference.sampling import SamplingParams

OUTPUTS = ("text", "speech", "audio")
FINISH_NAMES = {"END_ID": "stop", "STOP_WORDS": "stop", "LENGTH": "length", "TIMED_OUT": "timeout",
                "CANCELLED": "cancelled", "NOT_FINISHED": ""}


@dataclass
class LlmJob:
    """One request for the LLM step (see the module docstring)."""

    input_ids: list[int]
    max_new_tokens: int
    end_id: int
    pad_id: int
    sampling: SamplingParams
    uncond_input_ids: list[int] | None = None
    output: str = "text"
    prompt_table: torch.Tensor | None = None
    streaming: bool = False

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not self.input_ids:
            raise ValueError("input_ids is empty: the prompt needs at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.output == "text" and self.sampling.uses_cfg:
            raise ValueError("classifier-free guidance is for speech/audio outputs (TTS, TTA), not text")

    @property
    def guided(self) -> bool:
        return self.output != "text" and self.sampling.uses_cfg and bool(self.uncond_input_ids)


@dataclass
class JobEvent:
    """Tokens for a job: new tokens when streaming, all of them in the final event otherwise."""

    job_id: int
    tokens: list[int]
    final: bool
    finish_reason: str = ""
    error: str | None = None


def finish_reason(result) -> str:
    """The executor result's first finish reason as Audex names it (``stop``, ``length``, ``cancelled``, ...)."""
    reasons = getattr(result, "finish_reasons", None) or []
    if not reasons:
        return "stop"
    name = getattr(reasons[0], "name", str(reasons[0])).split(".")[-1]
    return FINISH_NAMES.get(name, name.lower())


def fits_step(job: LlmJob, *, inflight: int, max_inflight: int | None, max_num_tokens: int | None,
              waiting_context_tokens: Callable[[], int]) -> bool:
    """The admission rule of both LLM backends (the executor's and the LLM API's): the job's requests (2 for a CFG
    pair) fit the batch slots, and a pair also fits one step's token budget: every context not yet run
    (``waiting_context_tokens()``), both twin prompts and one token per request in flight within
    ``max_num_tokens``, so that TensorRT-LLM's scheduler starts both twins in the same step. An idle engine takes
    any job (a lone pair that is too long fails on the engine's own checks, with its message)."""
    if not inflight:
        return True
    if max_inflight is not None and inflight + (2 if job.guided else 1) > max_inflight:
        return False
    if job.guided and max_num_tokens is not None:
        tokens = len(job.input_ids) + len(job.uncond_input_ids)
        return waiting_context_tokens() + tokens + inflight <= max_num_tokens
    return True
