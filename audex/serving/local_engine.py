"""The local engine: serves requests in this process with Audex's own PyTorch generation (no TensorRT-LLM).

:class:`LocalEngine` checks every :class:`~audex.serving.requests.ServeRequest` with the shared
:class:`~audex.serving.requests.RequestValidator`, answers a bad one with an error that names the problem, and runs
the good ones through :class:`~audex.inference.pipelines.AudexPipeline` (KV-cached decoding, the paper's presets, CFG
pairs for TTS/TTA), dispatching through the task registry (:meth:`audex.tasks.Task.run`). Requests of one task with
the same overrides decode as one batch, which is what Triton's dynamic batcher hands a model instance. It serves
voice-prompted TTS (``voice`` + ``voice_text``, encoded with the model's speech codec) and tool chats (``tools``;
the result carries the parsed ``tool_calls``).

The Triton CPU repository runs it behind the python model (:class:`~audex.serving.triton.handlers.LocalEngineHandler`);
``bench/serve.py`` calls the same :meth:`LocalEngine.run` in-process.

Example::

    >>> engine = LocalEngine(model, ServeLimits(max_audio_seconds=30))
    >>> [res] = engine.run([ServeRequest(task="tts", text="Hello there.", seed=0)])
    >>> res.audio.shape, res.error
    (torch.Size([12800]), None)
"""

from __future__ import annotations

from typing import Sequence

import torch

from audex.inference.pipelines import AudexPipeline
from audex.serving.requests import (
    BadRequest,
    RequestValidator,
    ServeLimits,
    ServeRequest,
    ServeResult,
    serving_presets,
)
from audex.tasks import TASKS


def _result(task: str, out) -> ServeResult:
    """A pipeline result as a :class:`ServeResult` (ASR answers with the parsed transcription, TTA with its caption)."""
    if TASKS[task].output == "text":
        text = ((out.fields or {}).get("transcription") or out.text) if task == "asr" else out.text
        return ServeResult(text=text, finish_reason=out.finish_reason, tool_calls=getattr(out, "tool_calls", None),
                           tool_call_error=getattr(out, "tool_call_error", None))
    text = out.caption if TASKS[task].output == "audio" else out.text
    return ServeResult(text=text, audio=out.waveform.float(), finish_reason=out.finish_reason)


class LocalEngine:
    """Validates :class:`ServeRequest` s and runs them on one Audex model (see the module docstring)."""

    def __init__(self, model, limits: ServeLimits | None = None, presets_path: str | None = None):
        self.model = model
        self.limits = limits or ServeLimits()
        self.pipeline = AudexPipeline(model, presets=serving_presets(model.vocab, self.limits, presets_path))
        self.tokenizer = model.tokenizer
        self.vocab = model.vocab
        self.context = int(self.limits.max_context_tokens or model.backbone.config.max_position_embeddings)
        formatter = self.pipeline.formatter
        self.validator = RequestValidator(self.tokenizer, self.pipeline.prompt_ids, self.pipeline.presets, self.limits,
                                          self.context, model.frames_for_samples, formatter.audio_content,
                                          tool_prompt_ids=lambda turns, thinking, tools: formatter.encode_dialog(
                                              turns, thinking, tools)["input_ids"].tolist(),
                                          voice_prompts=model.speech_codec is not None)

    def validate(self, req: ServeRequest) -> tuple[str | None, torch.Tensor | None, int]:
        """``(text, audio, max_new_tokens)`` of a valid request, else :class:`BadRequest`."""
        return self.validator.validate(req)

    def _run_group(self, task: str, items: list[tuple[str | None, torch.Tensor | None, dict]], overrides: dict
                   ) -> list[ServeResult]:
        t = TASKS[task]
        records = [{"audio": wav, **({t.field: text} if t.field else {}), **extras} for text, wav, extras in items]
        return [_result(task, out) for out in t.run(self.pipeline, records, **overrides)]

    @torch.no_grad()
    def run(self, requests: Sequence[ServeRequest]) -> list[ServeResult]:
        """One result per request, in order. Bad requests get ``error``; the others decode in batches."""
        results: list[ServeResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        valid: dict[int, tuple] = {}
        for i, req in enumerate(requests):
            try:
                text, wav, budget, extras = self.validator.validate_full(req)
            except BadRequest as e:
                results[i] = ServeResult(error=str(e))
                continue
            overrides = {"max_new_tokens": budget}
            if req.seed is not None:
                overrides["seed"] = int(req.seed)
            if req.guidance_scale is not None and TASKS[req.task].cfg:
                overrides["guidance_scale"] = float(req.guidance_scale)
            key = (req.task, tuple(sorted(overrides.items())))
            groups.setdefault(key, []).append(i)
            valid[i] = (text, wav, extras)
        for (task, overrides), idx in groups.items():
            try:
                out = self._run_group(task, [valid[i] for i in idx], dict(overrides))
            except (ValueError, RuntimeError) as e:  # a failure of this batch must not take the server down
                out = [ServeResult(error=f"task {task!r} failed: {e}") for _ in idx]
            for i, res in zip(idx, out):
                results[i] = res
        return results  # type: ignore[return-value]
