"""One Lhotse ``CutSet`` schema for all six Audex example types.

One cut is one example. Manifests are plain Lhotse: JSONL (``CutSet.to_file("x.jsonl.gz")``) or Lhotse Shar
(``cuts.to_shar(dir, fields={"recording": "flac"})`` / ``lhotse shar export``); both round-trip every field
below. Where things live:

======================  =========================================  ===========================================
field                   where                                      tasks
======================  =========================================  ===========================================
task                    ``cut.custom["task"]``                      all: ``asr ast tts tta audio_qa text``
input audio             ``cut.recording`` (any rate and channel     asr, ast, audio_qa (tts/tta: optional, the
                        count; loaded as 16 kHz mono)               source that ``pretokenize.py`` encodes)
transcript              ``cut.supervisions[0].text``                asr, ast (source language), tts
language                ``cut.supervisions[0].language``            asr, ast (source), tts (optional)
translation             ``cut.custom["translation"]`` (English)     ast
language in the prompt  ``cut.custom["language_in_prompt"]``:       asr (multilingual, language-conditioned:
                        bool                                        appendix A.7)
caption                 ``cut.custom["caption"]``                   tta
question / answer       ``cut.custom["question"]`` /                audio_qa (the question without ``<sound>``;
                        ``cut.custom["answer"]``                    the prompt format places the audio)
chat                    ``cut.custom["messages"]``: list of         text
                        ``{"role": "system"|"user"|"assistant"|
                        "tool", "content": str, "thinking": str,
                        "tool_calls": [...]}``
tool definitions        ``cut.custom["tools"]``: list of            text (tool-calling chats,
                        ``{"type": "function", "function":          :mod:`audex.tool_calls`)
                        {"name", "description", "parameters"}}``
reasoning mode          ``cut.custom["thinking"]``: bool            text (audio tasks: always instruct mode)
speech codes            ``cut.custom["speech_codes"]``: base64      tts
voice prompt            ``cut.custom["voice_codes"]``: base64 +     tts (optional: voice-prompted TTS,
                        ``custom["voice_text"]`` (its transcript)   :mod:`audex.voice_prompt`)
audio codes             ``cut.custom["audio_codes"]``: base64 +     tta
                        ``custom["audio_codes_n_q"]`` (4)
CFG unconditional       ``cut.custom["cfg_uncond_pads"]``: int      tts, tta copies made by ``make_cfg_uncond``
======================  =========================================  ===========================================

Codec codes are **base64 of little-endian int32** (``numpy`` dtype ``"<i4"``), written C-contiguous:

* speech (X-Codec2): ``[T]`` codes, one per 20 ms frame (50 tokens/s);
* audio (X-Codec): ``[T, n_q]``, i.e. **frame-major** (``t0q0 t0q1 t0q2 t0q3 t1q0 ...``), the order in which
  the model generates them (:meth:`audex.vocab.AudexVocab.audio_codes_to_ids`); ``n_q`` (4) is stored in
  ``custom["audio_codes_n_q"]``. :func:`get_audio_codes` returns the codec's own ``[n_q, T]`` layout.

Text-only examples are ``MonoCut`` objects with ``recording=None`` and ``duration=0`` (Lhotse 1.33 serialises,
filters and shards them, Shar writes a placeholder for the missing audio). A TTS/TTA cut made from codes
alone has ``duration`` = codec frames / 50; one whose recording was dropped after pre-tokenisation keeps the
duration of its audio (the TTS filter reads it).

Build cuts with the ``make_*_cut`` helpers and read them with the ``get_*`` accessors: a missing or malformed
field raises :class:`~audex.data.skips.SkipSample` naming the cut, the field and the fix, so data pipelines
count it instead of crashing.

Example::

    >>> rec = Recording.from_file("1089-134686-0000.flac")
    >>> cut = make_asr_cut(rec, "HE HOPED THERE WOULD BE STEW", language="en")
    >>> get_task(cut), get_transcript(cut), get_language(cut)
    ('asr', 'HE HOPED THERE WOULD BE STEW', 'en')
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Sequence

import numpy as np
import torch
from lhotse import MonoCut, Recording, SupervisionSegment
from lhotse.cut import Cut
from lhotse.cut.data import DataCut

from audex.data.chats import ROLES, validate_messages  # noqa: F401  (ROLES: part of the schema's API)
from audex.data.skips import (
    CODES_OUT_OF_RANGE,
    INVALID_BASE64,
    INVALID_CODEC_CODES,
    INVALID_MESSAGES,
    MISSING_FIELD,
    UNKNOWN_TASK,
    SkipSample,
)
from audex.tasks import AUDIO_INPUT_DATA_TASKS, DATA_TASKS, GENERATION_DATA_TASKS
from audex.tool_calls import validate_tools

ASR = "asr"
AST = "ast"
TTS = "tts"
TTA = "tta"
AUDIO_QA = "audio_qa"
TEXT = "text"
#: the cut tasks, from the task registry (:mod:`audex.tasks`)
TASKS: tuple[str, ...] = DATA_TASKS
#: tasks whose input contains audio (``<sound>``)
AUDIO_INPUT_TASKS: tuple[str, ...] = AUDIO_INPUT_DATA_TASKS
#: tasks whose output is codec tokens (the ones CFG pre-processing touches)
GENERATION_TASKS: tuple[str, ...] = GENERATION_DATA_TASKS

CODES_DTYPE = np.dtype("<i4")
CODEC_FRAME_RATE = 50
SAMPLE_RATE = 16000


# ---- codec codes <-> base64 ---------------------------------------------------------------------
def encode_codes(codes: torch.Tensor | np.ndarray | Sequence[int]) -> str:
    """Integer codes (any shape, C order) -> base64 of little-endian int32."""
    arr = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"codec codes must fit in int32, got range [{arr.min()}, {arr.max()}]")
    return base64.b64encode(np.ascontiguousarray(arr, dtype=CODES_DTYPE).tobytes()).decode("ascii")


def decode_codes(b64: Any, field: str = "codes", cut_id: str | None = None) -> np.ndarray:
    """Inverse of :func:`encode_codes`: a flat int64 array; bad input raises :class:`SkipSample`."""
    if not isinstance(b64, str):
        raise SkipSample(INVALID_BASE64, f"custom[{field!r}] is a {type(b64).__name__}, expected a base64 string", cut_id)
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SkipSample(INVALID_BASE64, f"custom[{field!r}] is not valid base64 ({e})", cut_id) from None
    if len(raw) % CODES_DTYPE.itemsize:
        raise SkipSample(INVALID_CODEC_CODES, f"custom[{field!r}] holds {len(raw)} bytes, not a multiple of 4 "
                         "(little-endian int32 codes)", cut_id)
    return np.frombuffer(raw, dtype=CODES_DTYPE).astype(np.int64)


def encode_speech_codes(codes: torch.Tensor | np.ndarray) -> str:
    """X-Codec2 codes ``[T]`` -> base64."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if codes.ndim != 1:
        raise ValueError(f"speech codes must be [T], got shape {codes.shape}")
    return encode_codes(codes)


def encode_audio_codes(codes: torch.Tensor | np.ndarray) -> str:
    """X-Codec RVQ codes ``[n_q, T]`` -> base64 of the frame-major ``[T, n_q]`` array."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if codes.ndim != 2:
        raise ValueError(f"audio codes must be [n_q, T], got shape {codes.shape}")
    return encode_codes(codes.T)


def _check_range(codes: np.ndarray, codebook_size: int | None, field: str, cut_id: str | None):
    if codebook_size is not None and codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise SkipSample(CODES_OUT_OF_RANGE, f"custom[{field!r}] has codes in [{codes.min()}, {codes.max()}], the "
                         f"codebook holds [0, {codebook_size})", cut_id)


def get_speech_codes(cut: Cut, codebook_size: int | None = None) -> torch.Tensor:
    """Speech codes ``LongTensor[T]``; checked against ``codebook_size`` when given."""
    codes = decode_codes(_require_custom(cut, "speech_codes"), "speech_codes", cut.id)
    if codes.size == 0:
        raise SkipSample(INVALID_CODEC_CODES, "custom['speech_codes'] is empty", cut.id)
    _check_range(codes, codebook_size, "speech_codes", cut.id)
    return torch.from_numpy(codes.copy())


def get_voice_prompt(cut: Cut, codebook_size: int | None = None) -> tuple[torch.Tensor, str] | None:
    """``(voice codes LongTensor[T], voice_text)`` of a voice-prompted TTS cut, None for a fixed-voice one."""
    custom = cut.custom or {}
    if custom.get("voice_codes") is None and custom.get("voice_text") is None:
        return None
    text = _text_custom(cut, "voice_text")
    codes = decode_codes(_require_custom(cut, "voice_codes"), "voice_codes", cut.id)
    if codes.size == 0:
        raise SkipSample(INVALID_CODEC_CODES, "custom['voice_codes'] is empty", cut.id)
    _check_range(codes, codebook_size, "voice_codes", cut.id)
    return torch.from_numpy(codes.copy()), text


def get_audio_codes(cut: Cut, codebook_size: int | None = None) -> torch.Tensor:
    """Audio codes ``LongTensor[n_q, T]`` (the codec's layout); checked against ``codebook_size`` when given."""
    flat = decode_codes(_require_custom(cut, "audio_codes"), "audio_codes", cut.id)
    n_q = _require_custom(cut, "audio_codes_n_q")
    if not isinstance(n_q, int) or n_q <= 0:
        raise SkipSample(INVALID_CODEC_CODES, f"custom['audio_codes_n_q'] must be a positive int, got {n_q!r}", cut.id)
    if flat.size == 0 or flat.size % n_q:
        raise SkipSample(INVALID_CODEC_CODES, f"custom['audio_codes'] holds {flat.size} codes, not a positive "
                         f"multiple of n_q={n_q}", cut.id)
    _check_range(flat, codebook_size, "audio_codes", cut.id)
    return torch.from_numpy(flat.reshape(-1, n_q).T.copy())


def set_speech_codes(cut: Cut, codes: torch.Tensor | np.ndarray) -> Cut:
    cut.custom = dict(cut.custom or {})
    cut.custom["speech_codes"] = encode_speech_codes(codes)
    return cut


def set_audio_codes(cut: Cut, codes: torch.Tensor | np.ndarray) -> Cut:
    cut.custom = dict(cut.custom or {})
    cut.custom["audio_codes"] = encode_audio_codes(codes)
    cut.custom["audio_codes_n_q"] = int(np.asarray(codes).shape[0])
    return cut


def has_codes(cut: Cut) -> bool:
    """True when the cut's generation target is already pre-tokenised."""
    task = (cut.custom or {}).get("task")
    key = {TTS: "speech_codes", TTA: "audio_codes"}.get(task)
    return key is not None and isinstance((cut.custom or {}).get(key), str)


# ---- builders -----------------------------------------------------------------------------------
def _audio_cut(audio: Recording | Cut, cut_id: str | None) -> DataCut:
    # a multi-channel recording gives a MultiCut; the sequence builder averages its channels on load
    if isinstance(audio, Recording):
        cut = audio.to_cut()
    elif isinstance(audio, DataCut):
        cut = audio
    else:
        raise TypeError(f"audio must be a lhotse Recording or a MonoCut/MultiCut, got {type(audio).__name__}")
    if cut_id is not None:
        cut = cut.with_id(cut_id)
    cut.custom = dict(cut.custom or {})
    return cut


def _supervision(cut: Cut, text: str | None, language: str | None) -> SupervisionSegment:
    return SupervisionSegment(id=cut.id, recording_id=cut.recording_id if cut.has_recording else cut.id,
                              start=0.0, duration=cut.duration, channel=0, text=text, language=language)


def _nonempty(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def make_asr_cut(audio: Recording | Cut, transcript: str, language: str, cut_id: str | None = None,
                 language_in_prompt: bool = False) -> DataCut:
    """ASR example: audio in, ``language`` + ``transcript`` out; ``language_in_prompt`` states the language in
    the user prompt (language-conditioned multilingual ASR)."""
    cut = _audio_cut(audio, cut_id)
    cut.supervisions = [_supervision(cut, _nonempty(transcript, "transcript"), _nonempty(language, "language"))]
    cut.custom["task"] = ASR
    if language_in_prompt:
        cut.custom["language_in_prompt"] = True
    return cut


def make_ast_cut(audio: Recording | Cut, transcript: str, language: str, translation: str,
                 cut_id: str | None = None) -> DataCut:
    """AST example (X -> English): audio in, source language, source transcript and English translation out."""
    cut = _audio_cut(audio, cut_id)
    cut.supervisions = [_supervision(cut, _nonempty(transcript, "transcript"), _nonempty(language, "language"))]
    cut.custom.update(task=AST, translation=_nonempty(translation, "translation"))
    return cut


def make_audio_qa_cut(audio: Recording | Cut, question: str, answer: str, cut_id: str | None = None) -> DataCut:
    """Audio question answering (also captioning): audio + question in, answer out."""
    cut = _audio_cut(audio, cut_id)
    cut.supervisions = []
    cut.custom.update(task=AUDIO_QA, question=_nonempty(question, "question"), answer=_nonempty(answer, "answer"))
    return cut


def _generation_cut(audio: Recording | Cut | None, cut_id: str | None, duration: float) -> DataCut:
    if audio is not None:
        return _audio_cut(audio, cut_id)
    if cut_id is None:
        raise ValueError("a TTS/TTA cut without audio needs an explicit cut_id")
    return MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, recording=None, supervisions=[], custom={})


def make_tts_cut(transcript: str, audio: Recording | Cut | None = None, speech_codes=None,
                 language: str | None = None, cut_id: str | None = None, voice_codes=None,
                 voice_text: str | None = None) -> DataCut:
    """TTS example: transcript in, speech codes out. Give ``audio`` (to pre-tokenise later), codes, or both.
    ``voice_codes`` + ``voice_text`` (the speech codes and transcript of a reference clip of the same speaker)
    make it a voice-prompted example (:mod:`audex.voice_prompt`)."""
    if (voice_codes is None) != (voice_text is None):
        raise ValueError("a voice prompt needs both voice_codes (the reference's speech codes) and voice_text")
    if audio is None and speech_codes is None:
        raise ValueError("make_tts_cut needs the speech audio or its pre-tokenised speech_codes")
    n_frames = len(speech_codes) if speech_codes is not None else 0
    cut = _generation_cut(audio, cut_id, n_frames / CODEC_FRAME_RATE)
    cut.supervisions = [_supervision(cut, _nonempty(transcript, "transcript"), language)]
    cut.custom["task"] = TTS
    if speech_codes is not None:
        set_speech_codes(cut, speech_codes)
    if voice_codes is not None:
        if len(voice_codes) == 0:
            raise ValueError("voice_codes is empty")
        cut.custom["voice_codes"] = encode_speech_codes(voice_codes)
        cut.custom["voice_text"] = _nonempty(voice_text, "voice_text")
    return cut


def make_tta_cut(caption: str, audio: Recording | Cut | None = None, audio_codes=None,
                 cut_id: str | None = None) -> DataCut:
    """TTA example: caption in, audio codes ``[n_q, T]`` out. Give ``audio``, codes, or both."""
    if audio is None and audio_codes is None:
        raise ValueError("make_tta_cut needs the audio or its pre-tokenised audio_codes")
    n_frames = np.asarray(audio_codes).shape[-1] if audio_codes is not None else 0
    cut = _generation_cut(audio, cut_id, n_frames / CODEC_FRAME_RATE)
    cut.supervisions = []
    cut.custom.update(task=TTA, caption=_nonempty(caption, "caption"))
    if audio_codes is not None:
        set_audio_codes(cut, audio_codes)
    return cut


def make_text_cut(cut_id: str, messages: list[dict], thinking: bool = False, tools: list[dict] | None = None
                  ) -> DataCut:
    """Text-only chat: a cut without recording. ``messages`` as in :func:`validate_messages`; ``tools``: the tool
    definitions of a tool-calling chat."""
    messages = validate_messages(messages, thinking, cut_id, error=ValueError)
    custom = {"task": TEXT, "messages": messages, "thinking": bool(thinking)}
    if tools is not None:
        try:
            custom["tools"] = validate_tools(tools, "tools")
        except ValueError as e:
            raise ValueError(f"chat {cut_id!r}: {e}") from None
    return MonoCut(id=cut_id, start=0.0, duration=0.0, channel=0, recording=None, supervisions=[], custom=custom)


# ---- accessors ----------------------------------------------------------------------------------
def _require_custom(cut: Cut, key: str) -> Any:
    value = (cut.custom or {}).get(key)
    if value is None:
        raise SkipSample(MISSING_FIELD, f"custom[{key!r}] is missing (task {(cut.custom or {}).get('task')!r})", cut.id)
    return value


def get_task(cut: Cut) -> str:
    task = (cut.custom or {}).get("task")
    if task is None:
        raise SkipSample(UNKNOWN_TASK, "custom['task'] is missing", cut.id)
    if task not in TASKS:
        raise SkipSample(UNKNOWN_TASK, f"custom['task']={task!r}; known tasks: {list(TASKS)}", cut.id)
    return task


def _supervision_field(cut: Cut, attr: str, required: bool = True) -> str | None:
    value = getattr(cut.supervisions[0], attr) if cut.supervisions else None
    if required and (not isinstance(value, str) or not value.strip()):
        raise SkipSample(MISSING_FIELD, f"supervisions[0].{attr} is missing or empty (task {cut.custom.get('task')!r})",
                         cut.id)
    return value


def get_transcript(cut: Cut) -> str:
    return _supervision_field(cut, "text")


def get_language(cut: Cut, required: bool = True) -> str | None:
    return _supervision_field(cut, "language", required)


def _text_custom(cut: Cut, key: str) -> str:
    value = _require_custom(cut, key)
    if not isinstance(value, str) or not value.strip():
        raise SkipSample(MISSING_FIELD, f"custom[{key!r}] must be a non-empty string, got {value!r}", cut.id)
    return value


def get_translation(cut: Cut) -> str:
    return _text_custom(cut, "translation")


def get_caption(cut: Cut) -> str:
    return _text_custom(cut, "caption")


def get_question(cut: Cut) -> str:
    return _text_custom(cut, "question")


def get_answer(cut: Cut) -> str:
    return _text_custom(cut, "answer")


def language_in_prompt(cut: Cut) -> bool:
    return bool((cut.custom or {}).get("language_in_prompt", False))


def is_thinking(cut: Cut) -> bool:
    return bool((cut.custom or {}).get("thinking", False))


def get_messages(cut: Cut) -> list[dict]:
    return validate_messages(_require_custom(cut, "messages"), is_thinking(cut), cut.id)


def get_tools(cut: Cut) -> list[dict] | None:
    """The tool definitions of a tool-calling chat (``custom["tools"]``), None when it has none."""
    tools = (cut.custom or {}).get("tools")
    if tools is None:
        return None
    try:
        return validate_tools(tools, "custom['tools']")
    except ValueError as e:
        raise SkipSample(INVALID_MESSAGES, str(e), cut.id) from None


def get_cfg_uncond_pads(cut: Cut) -> int | None:
    """Number of ``<pad>`` tokens replacing the condition of a CFG-unconditional copy, else None."""
    n = (cut.custom or {}).get("cfg_uncond_pads")
    if n is None:
        return None
    if not isinstance(n, int) or n <= 0:
        raise SkipSample(MISSING_FIELD, f"custom['cfg_uncond_pads'] must be a positive int, got {n!r}", cut.id)
    return n
