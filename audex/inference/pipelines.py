"""Task pipelines: ASR, AST, audio QA, chat, TTS, TTA and speech-to-speech, all with one Audex model.

Each pipeline writes the paper's prompt (:mod:`audex.prompts`: Figure 2 templates, appendix A.6-A.10
prompts), expands ``<sound>`` into the encoder's frames as training did (:class:`~audex.data.sequence.SequenceBuilder`),
decodes with its preset (``conf/infer/presets.yaml``) under the task's token grammar, and turns the tokens into
its result: text (with the ASR/AST fields parsed), or codec codes and a 16 kHz waveform.

* ASR / AST: greedy; with a known language, multilingual ASR states it in the prompt and teacher-forces the
  answer's language field (appendix D).
* TTS / TTA: ``<speechgen_start>`` / ``<audiogen_start>`` opens the answer as in training; the unconditional
  CFG twin has the transcript/caption replaced by ``<pad>`` tokens so that both prompts have the same length;
  TTA yields exactly 2,000 codes (10 s). Long TTS input is split at sentence ends into groups that decode as
  rows of one batch, and their codes are joined and decoded in overlapping chunks.
* S2S (section 5.4, A.8): ASR -> text reasoning (thinking mode) with the ``\\boxed{}`` instruction -> answer
  extraction -> TTS of "The answer is {answer}".

Example::

    >>> pipe = AudexPipeline(model)
    >>> pipe.asr([wav])[0].text                                  # transcript
    >>> pipe.tts(["Hello, how are you today?"], seed=0)[0].waveform  # Tensor[T] at 16 kHz
    >>> pipe.tta(["Birds chirping in a forest."])[0].codes.shape     # torch.Size([4, 500])
    >>> pipe.s2s([question_wav])[0].answer
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from audex.data.sequence import SequenceBuilder
from audex.data.skips import SkipSample
from audex.inference.answers import extract_short_answer
from audex.inference.constraints import CodecConstraint
from audex.inference.decoding import AudexDecoder, GenerationOutput
from audex.inference.presets import Presets, TaskPreset, load_presets
from audex.inference.waveform import (
    audio_tokens_to_codes,
    speech_tokens_to_codes,
    speech_tokens_to_waveform,
)
from audex.prompts import (
    AST_PROMPT,
    SYSTEM_PROMPT,
    asr_question,
    entailment_question,
    get_prompt_formatter,
    hallucination_question,
    mcq_question,
    parse_speech_target,
    s2s_answer_text,
    s2s_reasoning_prompt,
    speech_target_prefix,
    tta_user_content,
    tts_user_content,
)
from audex.tool_calls import is_tool_chat, parse_tool_responses
from audex.voice_prompt import encode_voice_prompts, prompted_tts_content, voice_prefix_ids


# ---- results ------------------------------------------------------------------------------------
@dataclass
class TextResult:
    """A text answer; ``thinking`` holds the reasoning of a thinking-mode answer, ``fields`` the parsed
    ASR/AST answer (``language``, ``transcription``, ``translation``), ``tool_calls`` the parsed calls of a
    tool chat (``[{"type": "function", "function": {"name", "arguments"}}]``; ``tool_call_error`` says why
    an answer that tried to call a tool could not be parsed)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    thinking: str | None = None
    fields: dict | None = None
    tool_calls: list[dict] | None = None
    tool_call_error: str | None = None


@dataclass
class SpeechResult:
    """TTS output: X-Codec2 codes ``[T]`` and the 16 kHz waveform ``[T * 320]``."""

    text: str
    codes: torch.Tensor
    waveform: torch.Tensor
    finish_reason: str
    num_segments: int = 1


@dataclass
class AudioResult:
    """TTA output: X-Codec codes ``[4, 500]`` (10 s) and the 16 kHz waveform ``[160000]``."""

    caption: str
    codes: torch.Tensor
    waveform: torch.Tensor
    finish_reason: str


@dataclass
class SpeechToSpeechResult:
    """One turn of the A.8 cascade."""

    transcript: str
    reasoning: TextResult
    answer: str | None
    spoken_text: str
    speech: SpeechResult
    steps: dict = field(default_factory=dict)

    @property
    def answer_found(self) -> bool:
        return self.answer is not None


# ---- text helpers -------------------------------------------------------------------------------
def split_long_text(text: str, max_chars: int | None) -> list[str]:
    """Sentence groups of at most ``max_chars`` characters (a longer sentence is cut between words)."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("the text to synthesise is empty")
    if not max_chars or len(text) <= max_chars:
        return [text]
    pieces = []
    for sentence in re.split(r"(?<=[.!?;:])\s+", text):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    groups = [pieces[0]]
    for piece in pieces[1:]:
        if len(groups[-1]) + 1 + len(piece) <= max_chars:
            groups[-1] += " " + piece
        else:
            groups.append(piece)
    return groups


# ---- the pipelines ------------------------------------------------------------------------------
def generation_prompts(tokenizer, prompt_ids: Callable[[str, bool], list[int]], content_fn, conditions: Sequence[str],
                       opener: int | Sequence[int], thinking: bool) -> tuple[list[list[int]], list[list[int]]]:
    """TTS/TTA prompts and their unconditional twins: the condition replaced by as many ``<pad>`` tokens as it has
    tokens (how the CFG training copies were made), each prompt ending with the span opener
    (``<speechgen_start>`` / ``<audiogen_start>``; with a voice prompt, ``<speechgen_start>`` + its codes, the same in
    both rows). ``prompt_ids(content, thinking)`` writes the chat prompt."""
    opener = [opener] if isinstance(opener, int) else list(opener)
    cond, uncond = [], []
    one_pad = len(tokenizer.encode(content_fn(num_pads=1)))
    for text in conditions:
        content = content_fn(text)
        num_pads = max(1, len(tokenizer.encode(content)) - one_pad + 1)
        cond.append(prompt_ids(content, thinking) + opener)
        uncond.append(prompt_ids(content_fn(num_pads=num_pads), thinking) + opener)
    return cond, uncond


class AudexPipeline:
    """Every Audex task on one model (see the module docstring).

    Args:
        model: an :class:`~audex.models.audex_model.AudexModel` in eval mode.
        presets: task presets (default: ``conf/infer/presets.yaml``).
        prompt_format: registered Audex prompt format (``"audex"``: ``<sound>`` before the question, as in
            appendix A; ``"audex-sound-last"``: after it, as Figure 2b draws it).
        system_prompt: the system turn of every prompt (Figure 2's by default).

    Every task method takes a list of inputs (decoded as one batch) and sampling overrides as keyword
    arguments (``seed=0``, ``max_new_tokens=64``, ``guidance_scale=1.0``, ...).
    """

    def __init__(self, model, presets: Presets | None = None, prompt_format: str = "audex",
                 system_prompt: str | None = SYSTEM_PROMPT):
        self.model = model
        self.tokenizer = model.tokenizer
        self.vocab = model.vocab
        self.presets = presets if presets is not None else load_presets()
        self.formatter = get_prompt_formatter(prompt_format, self.tokenizer, system_prompt=system_prompt)
        self.decoder = AudexDecoder.for_model(model)
        frames_fn = model.frames_for_samples if getattr(model, "audio_encoder", None) is not None else None
        self._sequences = SequenceBuilder(self.tokenizer, frames_fn, max_length=None, prompt_format=self.formatter)

    # ---- prompts ------------------------------------------------------------------------------
    def prompt_ids(self, turns: str | Sequence[dict], thinking: bool = False) -> list[int]:
        """Generation prompt for a user content string (or a list of chat turns ending with a user turn)."""
        if isinstance(turns, str):
            turns = [{"role": "user", "content": turns}]
        turns = list(turns)
        if not turns or turns[-1].get("role") != "user":
            raise ValueError("a generation prompt needs chat turns that end with a user turn")
        return self.formatter.encode_dialog(turns, thinking=thinking)["input_ids"].tolist()

    def _with_audio(self, prompt: list[int], audios: Sequence[torch.Tensor], name: str) -> list[int]:
        frames = [self.model.frames_for_samples(int(a.numel())) for a in audios]
        try:
            return self._sequences.expand_sound(prompt, frames, name)
        except SkipSample as e:
            raise ValueError(f"{name}: {e}") from None

    def _preset(self, name: str) -> TaskPreset:
        return self.presets[name]

    def _decode(self, preset: TaskPreset, prompts: list[list[int]], *, audios: Sequence[Sequence[torch.Tensor]] | None = None,
                uncond_prompts: list[list[int]] | None = None, prompt_speech_seconds: float = 0.0,
                **overrides) -> GenerationOutput:
        params = preset.sampling.replace(**overrides) if overrides else preset.sampling
        # the speech cap counts the span's codes, a voice prompt's included: it gets the prompt's length on top
        max_speech = None if preset.max_speech_seconds is None else preset.max_speech_seconds + prompt_speech_seconds
        constraint = CodecConstraint.for_task(self.tokenizer, preset.output, audio_seconds=preset.audio_seconds or 10.0,
                                              max_speech_seconds=max_speech)
        audio_embeds = None
        if audios is not None and any(len(a) for a in audios):
            flat = [torch.as_tensor(w, dtype=torch.float32) for per_prompt in audios for w in per_prompt]
            embeds = iter(self.model.encode_audio(flat))
            audio_embeds = [[next(embeds) for _ in per_prompt] for per_prompt in audios]
        return self.decoder.generate(prompts, params, audio_embeds=audio_embeds,
                                     uncond_prompts=uncond_prompts if params.uses_cfg else None, constraint=constraint)

    def _text_results(self, out: GenerationOutput, thinking: bool, prefixes: Sequence[str] | None = None,
                      parse_fields: bool = False) -> list[TextResult]:
        tok = self.tokenizer
        results = []
        for row, (ids, reason) in enumerate(zip(out.token_ids, out.finish_reasons)):
            reasoning = None
            answer_ids = ids
            if thinking:
                if tok.think_end in ids:
                    cut = ids.index(tok.think_end)
                    reasoning, answer_ids = tok.decode(ids[:cut]).strip(), ids[cut + 1 :]
                else:  # ran out of tokens while thinking
                    reasoning, answer_ids = tok.decode(ids).strip(), []
            text = (prefixes[row] if prefixes else "") + tok.decode(answer_ids)
            text = text.strip()
            results.append(TextResult(text=text, token_ids=list(ids), finish_reason=reason, thinking=reasoning,
                                      fields=parse_speech_target(text) if parse_fields else None))
        return results

    # ---- speech and audio understanding -------------------------------------------------------
    def _audio_questions(self, preset_name: str, audios: Sequence[torch.Tensor], questions: Sequence[str],
                         forced: Sequence[str] | None = None, parse_fields: bool = False, **overrides) -> list[TextResult]:
        if len(audios) != len(questions):
            raise ValueError(f"got {len(audios)} audios for {len(questions)} questions: give one question per audio")
        preset = self._preset(preset_name)
        prompts = []
        for i, (wav, question) in enumerate(zip(audios, questions)):
            ids = self._with_audio(self.prompt_ids(self.formatter.audio_content(question), preset.thinking), [wav],
                                   f"input {i}")
            if forced and forced[i]:
                ids += self.tokenizer.encode(forced[i])
            prompts.append(ids)
        out = self._decode(preset, prompts, audios=[[w] for w in audios], **overrides)
        return self._text_results(out, preset.thinking, prefixes=forced, parse_fields=parse_fields)

    def asr(self, audios: Sequence[torch.Tensor], languages: Sequence[str | None] | None = None,
            **overrides) -> list[TextResult]:
        """Transcribe (A.7). With a language per input, the multilingual form: "Language: X" in the prompt and
        the answer's language field teacher-forced (appendix D). ``result.fields["transcription"]`` is the text."""
        languages = list(languages) if languages is not None else [None] * len(audios)
        if len(languages) != len(audios):
            raise ValueError(f"got {len(languages)} languages for {len(audios)} audios")
        if any(lang is not None for lang in languages) and not all(lang is not None for lang in languages):
            raise ValueError("give a language for every input or for none (one batch runs one preset)")
        if languages[0] is None:
            return self._audio_questions("asr", audios, [asr_question()] * len(audios), parse_fields=True, **overrides)
        # the forced field stops before the space that starts the transcript: byte-level BPE attaches that space
        # to the first word, as it did when the whole answer was tokenised in training
        forced = [speech_target_prefix(lang).rstrip(" ") for lang in languages]
        return self._audio_questions("asr_multilingual", audios, [asr_question(lang) for lang in languages],
                                     forced=forced, parse_fields=True, **overrides)

    def ast(self, audios: Sequence[torch.Tensor], **overrides) -> list[TextResult]:
        """Translate to English (A.7): the answer holds language, transcription and translation fields."""
        return self._audio_questions("ast", audios, [AST_PROMPT] * len(audios), parse_fields=True, **overrides)

    def audio_qa(self, audios: Sequence[torch.Tensor], questions: Sequence[str], **overrides) -> list[TextResult]:
        """Open audio question answering (section 5.3): the benchmark's question as the user turn."""
        return self._audio_questions("audio_qa", audios, questions, **overrides)

    def mcq(self, audios: Sequence[torch.Tensor], questions: Sequence[str], choices: Sequence[Sequence[str]],
            **overrides) -> list[TextResult]:
        """Multiple choice (MMAU/MMAR/MMSU prompt of A.9)."""
        return self._audio_questions("mcq", audios, [mcq_question(q, c) for q, c in zip(questions, choices)],
                                     **overrides)

    def entailment(self, audios: Sequence[torch.Tensor], descriptions: Sequence[str], **overrides) -> list[TextResult]:
        """Audio entailment (A.9): Yes / No / Maybe."""
        return self._audio_questions("entailment", audios, [entailment_question(d) for d in descriptions], **overrides)

    def hallucination(self, audios: Sequence[torch.Tensor], sound_events: Sequence[str], **overrides) -> list[TextResult]:
        """CMM hallucination check (A.9): "Did you hear {event} in the audio?"."""
        return self._audio_questions("hallucination", audios, [hallucination_question(e) for e in sound_events],
                                     **overrides)

    # ---- text ---------------------------------------------------------------------------------
    def chat(self, conversations: Sequence[str | Sequence[dict]], thinking: bool | None = None,
             preset: str = "chat", tools: Sequence[dict] | None = None, **overrides) -> list[TextResult]:
        """Text chat (Figure 2a): each conversation is a user message or turns ending with a user turn.
        ``thinking`` overrides the preset's mode (thinking: ``<think>\\n``; instruct: ``<think></think>``).

        With ``tools`` (transformers tool definitions, for every conversation) or tool turns, the prompt is the
        backbone's chat template with the tools in the system turn (:mod:`audex.tool_calls`), a conversation may
        end with ``tool`` responses, and each result carries the parsed ``tool_calls``::

            >>> r = pipe.chat(["Weather in Paris?"], tools=[weather_tool])[0]
            >>> r.tool_calls    # [{"type": "function", "function": {"name": "get_weather", "arguments": {...}}}]
        """
        p = self._preset(preset)
        thinking = p.thinking if thinking is None else bool(thinking)
        if tools or any(not isinstance(c, str) and is_tool_chat(c) for c in conversations):
            return self._tool_chat(p, conversations, thinking, tools, overrides)
        prompts = [self.prompt_ids(c, thinking) for c in conversations]
        return self._text_results(self._decode(p, prompts, **overrides), thinking)

    def _tool_chat(self, preset: TaskPreset, conversations, thinking: bool, tools, overrides) -> list[TextResult]:
        dialogs = [[{"role": "user", "content": c}] if isinstance(c, str) else list(c) for c in conversations]
        for i, turns in enumerate(dialogs):
            if not turns or turns[-1].get("role") not in ("user", "tool"):
                raise ValueError(f"conversation {i}: a tool-chat prompt must end with a user or tool turn")
        prefixes = [self.formatter.render_text(t, thinking, tools) for t in dialogs]
        prompts = [self.formatter.encode_dialog(t, thinking, tools)["input_ids"].tolist() for t in dialogs]
        out = self._decode(preset, prompts, **overrides)
        parsed = parse_tool_responses(self.tokenizer.hf, [self.tokenizer.decode(ids) for ids in out.token_ids],
                                      prefixes, tools)
        return [TextResult(text=(p.get("content") or "").strip(), token_ids=list(ids), finish_reason=reason,
                           thinking=p.get("thinking"), tool_calls=p.get("tool_calls", []), tool_call_error=error)
                for (p, error), ids, reason in zip(parsed, out.token_ids, out.finish_reasons)]

    # ---- generation ---------------------------------------------------------------------------
    def _generation_prompts(self, content_fn, conditions: Sequence[str], opener: int, thinking: bool):
        """Conditional prompts and their same-length unconditional twins (condition -> ``<pad>`` x n)."""
        return generation_prompts(self.tokenizer, self.prompt_ids, content_fn, conditions, opener, thinking)

    def tts_codes(self, texts: Sequence[str], voice=None, voice_text: str | Sequence[str] | None = None,
                  **overrides) -> list[tuple[torch.Tensor, str, int]]:
        """Speech codes per text (long texts in sentence groups, joined): ``(codes [T], finish_reason, groups)``.
        ``voice`` / ``voice_text``: a voice prompt (see :meth:`tts`)."""
        preset = self._preset("tts")
        voices = encode_voice_prompts(self.model.speech_codec, len(texts), voice, voice_text)
        segments, owner = [], []
        for i, text in enumerate(texts):
            for seg in split_long_text(text, preset.long_form_max_chars):
                segments.append(seg)
                owner.append(i)
        if voices is None:
            cond, uncond = self._generation_prompts(tts_user_content, segments, self.vocab.speechgen_start,
                                                    preset.thinking)
            out = self._decode(preset, cond, uncond_prompts=uncond, **overrides)
        else:
            cond, uncond = [], []
            for seg, i in zip(segments, owner):
                codes, words = voices[i]
                content_fn = prompted_tts_content(words)
                c, u = self._generation_prompts(content_fn, [seg], voice_prefix_ids(self.vocab, codes), preset.thinking)
                cond += c
                uncond += u
            longest = max(int(codes.numel()) for codes, _ in voices) / self.vocab.tokens_per_second("speech")
            out = self._decode(preset, cond, uncond_prompts=uncond, prompt_speech_seconds=longest, **overrides)
        results = []
        for i in range(len(texts)):
            rows = [r for r, o in enumerate(owner) if o == i]
            codes = torch.cat([speech_tokens_to_codes(self.vocab, out.token_ids[r]) for r in rows])
            reason = "stop" if all(out.finish_reasons[r] == "stop" for r in rows) else "length"
            results.append((codes, reason, len(rows)))
        return results

    def tts(self, texts: Sequence[str], voice=None, voice_text: str | Sequence[str] | None = None,
            **overrides) -> list[SpeechResult]:
        """Text to speech (A.6 template; top-k 80, T 0.1, lambda 1.5). With ``voice`` (a 16 kHz reference waveform,
        or its X-Codec2 codes; one for all texts or one per text) and ``voice_text`` (its transcript) the speech
        continues the reference's voice (:mod:`audex.voice_prompt`); the CFG twin keeps the reference codes."""
        results = []
        for text, (codes, reason, n_groups) in zip(texts, self.tts_codes(texts, voice, voice_text, **overrides)):
            ids = self.vocab.speech_codes_to_ids(codes).tolist()
            results.append(SpeechResult(text=text, codes=codes, waveform=speech_tokens_to_waveform(self.model, ids),
                                        finish_reason=reason, num_segments=n_groups))
        return results

    def tta(self, captions: Sequence[str], **overrides) -> list[AudioResult]:
        """Text to audio (A.10 template; top-k 80, T 1.0, lambda 3): 2,000 codes = 10 s at 16 kHz."""
        preset = self._preset("tta")
        constraint_tokens = int(round(preset.audio_seconds * self.vocab.tokens_per_second("audio")))
        params = preset.sampling.replace(**overrides) if overrides else preset.sampling
        if params.max_new_tokens < constraint_tokens + 2:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} cannot hold a {preset.audio_seconds:g} s TTA answer: "
                             f"it needs {constraint_tokens} codes + <audiogen_end> + <|im_end|> = {constraint_tokens + 2}")
        cond, uncond = self._generation_prompts(tta_user_content, captions, self.vocab.audiogen_start, preset.thinking)
        out = self._decode(preset, cond, uncond_prompts=uncond, **overrides)
        codec = self.model.audio_codec
        if codec is None:
            raise RuntimeError("this model has no audio_codec: configure model.audio_codec to decode TTA output")
        results = []
        for caption, ids, reason in zip(captions, out.token_ids, out.finish_reasons):
            codes = audio_tokens_to_codes(self.vocab, ids)
            results.append(AudioResult(caption=caption, codes=codes, waveform=codec.decode(codes), finish_reason=reason))
        return results

    # ---- speech to speech ---------------------------------------------------------------------
    def s2s(self, audios: Sequence[torch.Tensor], transcribe: dict | None = None, reason: dict | None = None,
            speak: dict | None = None) -> list[SpeechToSpeechResult]:
        """The A.8 cascade with this one model. ``transcribe``/``reason``/``speak`` are sampling overrides
        of each step's preset (e.g. ``reason={"max_new_tokens": 4096}``)."""
        steps = self.presets.s2s
        if steps is None:
            raise KeyError("the presets have no 's2s' entry (see conf/infer/presets.yaml)")
        asr = self._audio_questions(steps.transcribe, audios, [asr_question()] * len(audios), parse_fields=True,
                                    **(transcribe or {}))
        transcripts = [r.fields["transcription"] or r.text for r in asr]
        reasoning = self.chat([s2s_reasoning_prompt(t) for t in transcripts], preset=steps.reason, **(reason or {}))
        answers = [extract_short_answer(r.text) or extract_short_answer(r.thinking or "") for r in reasoning]
        # no extractable answer: speak the final response itself, so that every input gets speech back
        spoken = [s2s_answer_text(a) if a is not None else (r.text or r.thinking or "") for a, r in zip(answers, reasoning)]
        speech = self.tts([s if s.strip() else s2s_answer_text("unknown") for s in spoken], **(speak or {}))
        return [SpeechToSpeechResult(transcript=t, reasoning=r, answer=a, spoken_text=sp.text, speech=sp,
                                     steps={"asr": x})
                for t, r, a, sp, x in zip(transcripts, reasoning, answers, speech, asr)]
