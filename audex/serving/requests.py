"""The serving request schema, defined once: what a request is, what the server accepts, and how it refuses.

A request is plain data (:class:`ServeRequest`: task, text, audio, sample rate, overrides); a result is
:class:`ServeResult`. :class:`RequestValidator` checks a request against :class:`ServeLimits` and the model
(unknown task, empty or NaN audio, audio over the limit, prompt over the context, missing text, a voice prompt or
tools on a task or a server that does not take them) and writes its prompt; a bad request raises :class:`BadRequest` naming the problem. The local engine
(:class:`~audex.serving.local_engine.LocalEngine`) and the GPU ensemble's preprocessing step
(:class:`~audex.serving.triton.llm_io.LlmInputBuilder`) both validate with it, so they refuse the same requests with
the same messages. The served tasks come from the task registry (:data:`audex.tasks.SERVED_TASKS`).

Example::

    >>> limits = ServeLimits.from_params({"max_audio_seconds": "12"})     # a Triton config.pbtxt's strings
    >>> limits.max_audio_seconds, limits.max_new_tokens
    (12.0, 512)
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields

import torch

from audex.audio import AudioInputError, to_model_audio
from audex.inference.pipelines import generation_prompts
from audex.inference.presets import load_presets
from audex.prompts import (
    AST_PROMPT,
    SoundPlaceholderError,
    asr_question,
    expand_sound,
    tta_user_content,
    tts_user_content,
)
from audex.tasks import SERVED_TASKS, TASKS
from audex.tool_calls import validate_tools
from audex.voice_prompt import prompted_tts_content, voice_prefix_ids

#: the served tasks that take an input audio (ASR, AST, audio QA)
SERVED_AUDIO_IN = tuple(name for name in SERVED_TASKS if TASKS[name].audio_in)


class BadRequest(ValueError):
    """A request the server refuses; the message names the input and the fix."""


@dataclass
class ServeRequest:
    """One request. ``audio`` is a 1-D waveform at ``sample_rate`` (ASR/AST/audio QA); ``text`` is the chat message,
    the audio-QA question, the TTS transcript or the TTA caption. ``voice`` (a waveform at ``voice_sample_rate``)
    and ``voice_text`` (its transcript) make a TTS request voice-prompted (:mod:`audex.voice_prompt`); ``tools``
    (OpenAI / transformers tool definitions) make a chat request a tool chat (:mod:`audex.tool_calls`)."""

    task: str
    text: str | None = None
    audio: torch.Tensor | None = None
    sample_rate: int = 16000
    max_new_tokens: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    voice: torch.Tensor | None = None
    voice_sample_rate: int = 16000
    voice_text: str | None = None
    tools: list[dict] | None = None


@dataclass
class ServeResult:
    """``text`` for text tasks, ``audio`` (16 kHz float waveform) for TTS/TTA; ``error`` is set for a refused request.
    A tool chat also gives ``tool_calls`` (``[{"type": "function", "function": {"name", "arguments"}}]``) and, when
    an answer that tried to call a tool could not be parsed, ``tool_call_error``."""

    text: str = ""
    audio: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    finish_reason: str = ""
    error: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_error: str | None = None


@dataclass(frozen=True)
class ServeLimits:
    """What the server accepts (``export.yaml`` ``serve:``).

    Args:
        max_audio_seconds: longest input audio.
        max_new_tokens: cap on generated tokens for text tasks (a request may ask for fewer).
        max_speech_seconds: cap on TTS output (50 tokens per second).
        max_context_tokens: prompt + generation budget; None = the backbone's ``max_position_embeddings``.
        tta_seconds: TTA output length (10 s = 2,000 tokens in the paper).
        max_text_chars: longest text input.
        max_voice_seconds: longest voice prompt of a TTS request (its codes, 50 per second, are prompt tokens).
    """

    max_audio_seconds: float = 30.0
    max_new_tokens: int = 512
    max_speech_seconds: float = 30.0
    max_context_tokens: int | None = None
    tta_seconds: float = 10.0
    max_text_chars: int = 4000
    max_voice_seconds: float = 15.0

    @classmethod
    def from_config(cls, node) -> "ServeLimits":
        """From the ``serve`` node of ``export.yaml`` (other keys of the node are ignored)."""
        return cls(**{f.name: node[f.name] for f in fields(cls) if f.name in node})

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "ServeLimits":
        """From a Triton model's ``config.pbtxt`` parameters (strings; ``""`` or ``"None"`` = the default)."""
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            raw = params.get(f.name)
            if raw in (None, "", "None"):
                continue
            cast = int if hints[f.name] is int or int in typing.get_args(hints[f.name]) else float
            try:
                values[f.name] = cast(raw)
            except ValueError:
                raise ValueError(f"model parameter {f.name!r} must be a number, got {raw!r}") from None
        return cls(**values)

    def as_params(self) -> dict[str, str]:
        """The limits as ``config.pbtxt`` parameters (the inverse of :meth:`from_params`)."""
        return {f.name: str(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}


def serving_presets(vocab, limits: ServeLimits, presets_path: str | None = None):
    """The paper's presets with the TTA length of the limits (10 s = 2,000 codes + the two end tokens by default)."""
    tta_tokens = int(round(limits.tta_seconds * vocab.tokens_per_second("audio")))
    return load_presets(presets_path, overrides=[f"tta.audio_seconds={limits.tta_seconds}",
                                                 f"tta.sampling.max_new_tokens={tta_tokens + 2}"])


class RequestValidator:
    """Checks a :class:`ServeRequest` against the limits and the model's context; needs no weights, so the CPU engine
    and the GPU ensemble's preprocessing step refuse the same requests with the same messages.

    Args:
        tokenizer: the :class:`~audex.tokenizer.AudexTokenizer` (its vocabulary gives the token rates).
        prompt_ids: ``(content, thinking) -> ids`` of the chat prompt (the Audex prompt format).
        presets: the task presets (:func:`serving_presets`).
        limits: the :class:`ServeLimits`.
        context: prompt + generation budget in tokens.
        frames_for_samples: ``num_samples -> encoder frames`` (750 per 30 s window).
        audio_content: ``question -> user content`` with the ``<sound>`` placeholder.
        tool_prompt_ids: ``(turns, thinking, tools) -> ids`` of a tool chat; None: the server refuses ``tools``.
        voice_prompts: the server encodes voice prompts (it holds the speech codec); False: it refuses them.
    """

    def __init__(self, tokenizer, prompt_ids, presets, limits: ServeLimits, context: int, frames_for_samples,
                 audio_content, tool_prompt_ids=None, voice_prompts: bool = False):
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.presets = presets
        self.vocab = tokenizer.vocab
        self.limits = limits
        self.context = int(context)
        self.frames_for_samples = frames_for_samples
        self.audio_content = audio_content
        self.tool_prompt_ids = tool_prompt_ids
        self.voice_prompts = bool(voice_prompts)

    def tta_tokens(self) -> int:
        return int(round(self.limits.tta_seconds * self.vocab.tokens_per_second("audio")))

    def _text(self, req: ServeRequest, what: str, name: str = "text") -> str:
        text = (getattr(req, name) or "").strip()
        if not text:
            raise BadRequest(f"task {req.task!r} needs a non-empty {name!r} input ({what})")
        if len(text) > self.limits.max_text_chars:
            raise BadRequest(f"{name!r} has {len(text)} characters, over the limit of {self.limits.max_text_chars}")
        return text

    def _audio(self, req: ServeRequest, name: str = "audio", limit_key: str = "max_audio_seconds") -> torch.Tensor:
        raw, rate = (req.audio, req.sample_rate) if name == "audio" else (req.voice, req.voice_sample_rate)
        if raw is None:
            raise BadRequest(f"task {req.task!r} needs an {name!r} input (mono waveform, FP32)")
        try:
            wav = to_model_audio(raw, int(rate), name=f"{name!r}")
        except AudioInputError as e:
            raise BadRequest(str(e)) from None
        seconds, limit = wav.numel() / 16000, getattr(self.limits, limit_key)
        if seconds > limit:
            raise BadRequest(f"{name!r} is {seconds:.1f} s long, over the server's limit of {limit:g} s: "
                             f"shorten it or raise serve.{limit_key}")
        return wav

    def extras(self, req: ServeRequest) -> dict:
        """The checked optional inputs as record fields: ``{"voice", "voice_text"}`` for a voice-prompted TTS request,
        ``{"tools"}`` for a tool chat, else ``{}``; :class:`BadRequest` when the task or this server cannot take them."""
        out: dict = {}
        if req.tools is not None:
            if req.task != "chat":
                raise BadRequest(f"'tools' is an input of task 'chat' only, not of {req.task!r}")
            if self.tool_prompt_ids is None:
                raise BadRequest("this server's LLM path does not take 'tools': serve tool chats with the CPU layout "
                                 "(LocalEngine) or drop 'tools'")
            try:
                out["tools"] = validate_tools(req.tools, "'tools'")
            except ValueError as e:
                raise BadRequest(str(e)) from None
        if req.voice is not None or req.voice_text is not None:
            if req.task != "tts":
                raise BadRequest(f"'voice' and 'voice_text' are inputs of task 'tts' only, not of {req.task!r}")
            if not self.voice_prompts:
                raise BadRequest("this server's LLM path does not encode voice prompts: serve voice-prompted TTS "
                                 "with the CPU layout (LocalEngine) or drop 'voice' and 'voice_text'")
            out["voice"] = self._audio(req, "voice", "max_voice_seconds")
            out["voice_text"] = self._text(req, "the transcript of the voice prompt", "voice_text")
        return out

    def prompts(self, task: str, text: str | None, n_frames: int = 0, extras: dict | None = None
                ) -> tuple[list[int], list[int] | None]:
        """The task's prompt ids (``<sound>`` expanded to ``<so_start>`` + ``n_frames`` x ``<so_embedding>`` +
        ``<so_end>``) and, for TTS/TTA, the unconditional twin (condition -> ``<pad>`` tokens). With ``extras``
        (:meth:`extras`) a tool chat's template, or a voice prompt's transcript and as many codes as its audio gives."""
        tok, thinking, extras = self.tokenizer, self.presets[task].thinking, extras or {}
        if "tools" in extras:
            return self.tool_prompt_ids([{"role": "user", "content": text}], thinking, extras["tools"]), None
        if "voice" in extras:
            n_codes = math.ceil(extras["voice"].numel() * self.vocab.tokens_per_second("speech") / 16000)
            cond, uncond = generation_prompts(tok, self.prompt_ids, prompted_tts_content(extras["voice_text"]), [text],
                                              voice_prefix_ids(self.vocab, [0] * n_codes), thinking)
            return cond[0], uncond[0]
        if task in SERVED_AUDIO_IN:
            question = {"asr": asr_question(), "ast": AST_PROMPT}.get(task, text)
            ids = self.prompt_ids(self.audio_content(question), thinking)
            try:
                return expand_sound(ids, [n_frames], tok)[0], None
            except SoundPlaceholderError as e:
                raise BadRequest(f"'text' cannot hold audio placeholders: {e}") from None
        if task == "chat":
            return self.prompt_ids(text, thinking), None
        content_fn, opener = ((tts_user_content, self.vocab.speechgen_start) if task == "tts"
                              else (tta_user_content, self.vocab.audiogen_start))
        cond, uncond = generation_prompts(tok, self.prompt_ids, content_fn, [text], opener, thinking)
        return cond[0], uncond[0]

    def prompt_length(self, task: str, text: str | None, wav: torch.Tensor | None, extras: dict | None = None) -> int:
        frames = self.frames_for_samples(wav.numel()) if task in SERVED_AUDIO_IN else 0
        return len(self.prompts(task, text, frames, extras)[0])

    def budget(self, req: ServeRequest, prompt_len: int) -> int:
        room = self.context - prompt_len
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_len} tokens long, over the model's context of {self.context} "
                             "tokens: shorten the text or the audio")
        if req.max_new_tokens is not None and req.max_new_tokens < 1:
            raise BadRequest(f"'max_new_tokens' must be >= 1, got {req.max_new_tokens}")
        if req.task == "tta":
            need = self.tta_tokens() + 2
            if room < need:
                raise BadRequest(f"the TTA prompt ({prompt_len} tokens) leaves {room} of the {self.context}-token context, "
                                 f"but {self.limits.tta_seconds:g} s of audio needs {need} tokens: shorten the caption")
            return need
        if req.task == "tts":
            cap = int(self.limits.max_speech_seconds * self.vocab.tokens_per_second("speech")) + 2
        else:
            cap = self.limits.max_new_tokens
        wanted = min(cap, req.max_new_tokens or cap)
        return max(1, min(wanted, room))

    def validate(self, req: ServeRequest) -> tuple[str | None, torch.Tensor | None, int]:
        """``(text, audio, max_new_tokens)`` of a valid request, else :class:`BadRequest`."""
        return self.validate_full(req)[:3]

    def validate_full(self, req: ServeRequest) -> tuple[str | None, torch.Tensor | None, int, dict]:
        """``(text, audio, max_new_tokens, extras)`` of a valid request (``extras``: :meth:`extras`), else
        :class:`BadRequest`."""
        if req.task not in SERVED_TASKS:
            raise BadRequest(f"unknown task {req.task!r}; this server runs {list(SERVED_TASKS)}")
        if req.guidance_scale is not None and not (math.isfinite(req.guidance_scale) and req.guidance_scale >= 0):
            raise BadRequest(f"'guidance_scale' must be a finite number >= 0, got {req.guidance_scale}")
        wav, text = None, None
        if req.task in SERVED_AUDIO_IN:
            wav = self._audio(req)
            if req.task == "audio_qa":
                text = self._text(req, "the question about the audio")
        elif req.task == "chat":
            text = self._text(req, "the user message")
        else:
            text = self._text(req, "the transcript" if req.task == "tts" else "the caption")
        extras = self.extras(req)
        return text, wav, self.budget(req, self.prompt_length(req.task, text, wav, extras)), extras
