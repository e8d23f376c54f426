"""The sequence builder: one cut -> token ids, labels and the audios its ``<sound>`` placeholders stand for.

For every task of :mod:`audex.data.schema` the builder writes the dialog of Figure 2 with
:mod:`audex.prompts`, tokenises it, and then

* expands each ``<sound>`` to ``<so_start>`` + N x ``<so_embedding>`` + ``<so_end>``, N = ``frames_fn(samples)``
  (the model's :meth:`~audex.models.audex_model.AudexModel.frames_for_samples`: 750 per started 30 s window);
  the waveforms (16 kHz mono) are returned in order of appearance, for ``AudexModel.encode_audio``;
* writes TTS answers as ``<speechgen_start>`` + speech-codec ids + ``<speechgen_end>`` and TTA answers as
  ``<audiogen_start>`` + 2,000 audio-codec ids (500 frames x 4 RVQ layers, frame-major) + ``<audiogen_end>``.
  TTA is fixed at 10 s: longer code sequences are cropped to their first 500 frames; shorter ones are
  rejected (``invalid_codec_codes``), because ``scripts/pretokenize.py`` zero-pads every TTA clip to exactly
  10 s before encoding, so a short one means the manifest was not made by it;
* writes a voice-prompted TTS cut (``custom["voice_codes"]``, ``custom["voice_text"]``) VALL-E style, the
  reference codes opening the answer as untrained context (:mod:`audex.voice_prompt`);
* emits ``<pad>`` x k in place of the transcript/caption of a CFG-unconditional copy
  (``custom["cfg_uncond_pads"] = k``, made by :mod:`audex.data.cfg_uncond`);
* renders a tool-calling chat (``custom["tools"]``, assistant ``tool_calls``, ``tool`` turns) with the
  backbone's chat template (:mod:`audex.tool_calls`);
* sets ``labels`` = ``input_ids`` on trainable (assistant) tokens and -100 elsewhere, unshifted.

Bad input raises :class:`~audex.data.skips.SkipSample` with its reason (missing/corrupt/empty audio, invalid
base64, codes out of range, too long for the context, unknown task, ...), for a
:class:`~audex.data.skips.SkipCounter` to count.

Example::

    >>> builder = SequenceBuilder(model.tokenizer, WindowedFrames.from_model(model), max_length=8192)
    >>> seq = builder(cut)                      # BuiltSequence
    >>> seq.input_ids.shape, seq.num_audio_frames, seq.labels.ne(-100).sum()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from lhotse.cut import Cut, MixedCut
from lhotse.utils import compute_num_samples
from nemo.collections.common.data.prompt_fn import registered_prompt_format_fn

from audex.audio import AudioInputError, to_model_audio
from audex.data import schema
from audex.data.skips import (
    AUDIO_PLACEHOLDER_MISMATCH,
    CORRUPT_AUDIO,
    INVALID_CODEC_CODES,
    INVALID_MESSAGES,
    MISSING_AUDIO,
    MISSING_FIELD,
    TOO_LONG_FOR_CONTEXT,
    ZERO_LENGTH_AUDIO,
    SkipSample,
)
from audex.data.sources import adapt_cut
from audex.modules.audio_encoder import WindowedFrames
from audex.prompts import (
    AST_PROMPT,
    SYSTEM_PROMPT,
    AudexPromptFormatter,
    SoundPlaceholderError,
    asr_question,
    asr_target,
    ast_target,
    expand_sound,
    get_prompt_formatter,
    tta_user_content,
    tts_user_content,
)
from audex.tool_calls import is_tool_chat
from audex.voice_prompt import prompted_transcript, voice_prefix_ids

IGNORE_INDEX = -100
SAMPLE_RATE = 16000
TTA_SECONDS = 10.0
PAPER_CONTEXT_LENGTH = 262144


@dataclass
class BuiltSequence:
    """One example, ready for packing: ``labels`` are unshifted (-100 = not trained)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    audios: list[torch.Tensor]
    task: str
    cut_id: str
    num_audio_frames: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_trainable(self) -> int:
        return int(self.labels.ne(IGNORE_INDEX).sum())


def load_cut_audio(cut: Cut) -> torch.Tensor:
    """The cut's audio as a 16 kHz mono float waveform ``[T]``; bad audio raises :class:`SkipSample`.

    Lhotse reads the cut's span (any source: file, Shar tar, memory); :func:`audex.audio.to_model_audio`
    does the down-mix and resampling that every other audio input of Audex gets too.
    """
    if not cut.has_recording:
        raise SkipSample(MISSING_FIELD, f"task {cut.custom.get('task')!r} needs audio but the cut has no recording",
                         cut.id)
    # a MixedCut (noisy copy) has no single recording: check every track that has one
    recordings = ([t.cut.recording for t in cut.tracks if getattr(t.cut, "has_recording", False)]
                  if isinstance(cut, MixedCut) else [cut.recording])
    what = ", ".join(repr(r.id) for r in recordings)
    for rec in recordings:
        for src in rec.sources:
            if src.type == "file" and not Path(src.source).is_file():
                raise SkipSample(MISSING_AUDIO, f"{src.source} does not exist", cut.id)
    if cut.num_samples == 0:
        raise SkipSample(ZERO_LENGTH_AUDIO, f"the recording {what} has no samples", cut.id)
    try:
        audio = cut.load_audio()
    except Exception as e:  # lhotse wraps every backend's error; the message names the file
        raise SkipSample(CORRUPT_AUDIO, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", cut.id) from None
    if audio.size == 0:
        raise SkipSample(ZERO_LENGTH_AUDIO, f"{what} decoded to 0 samples", cut.id)
    try:
        return to_model_audio(audio, cut.sampling_rate, name=f"recording {what}")
    except AudioInputError as e:  # NaN/inf samples, unusable shapes
        raise SkipSample(CORRUPT_AUDIO, str(e), cut.id) from None


class SequenceBuilder:
    """Cut -> :class:`BuiltSequence` (see the module docstring).

    Args:
        tokenizer: an :class:`~audex.tokenizer.AudexTokenizer` (its ``vocab`` maps codec codes to ids).
        frames_fn: audio samples (16 kHz) -> encoder frames N; default :class:`WindowedFrames` (750 per 30 s).
        max_length: longest sequence allowed (default: the paper's 262,144-token context); longer -> skipped.
        prompt_format: a registered Audex prompt format name (``"audex"``, ``"audex-sound-last"``) or instance.
        system_prompt: the system turn written when a chat has none (None: no system turn).
        tta_num_frames: codec frames of a TTA answer (10 s x 50 Hz = 500).
        load_audio: False gives ids and N from the manifest's durations without reading audio
            (``audios`` is then empty); used by :meth:`count_tokens`.

    Example::

        >>> builder = SequenceBuilder(AudexTokenizer.build_tiny(), max_length=4096)
        >>> seq = builder(make_text_cut("c1", [{"role": "user", "content": "Hi"},
        ...                                    {"role": "assistant", "content": "Hello!"}]))
        >>> seq.task, seq.labels[seq.labels != -100].tolist() == builder.tokenizer.encode("Hello!<|im_end|>")
        ('text', True)
    """

    def __init__(self, tokenizer, frames_fn: Callable[[int], int] | None = None,
                 max_length: int | None = PAPER_CONTEXT_LENGTH, prompt_format: str | AudexPromptFormatter = "audex",
                 system_prompt: str | None = SYSTEM_PROMPT, tta_num_frames: int = int(TTA_SECONDS * 50),
                 load_audio: bool = True):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        self.frames_fn = frames_fn or WindowedFrames()
        self.max_length = max_length
        self.formatter = get_prompt_formatter(prompt_format, tokenizer, system_prompt=system_prompt)
        self.tta_num_frames = int(tta_num_frames)
        self.load_audio = load_audio

    # ---- public --------------------------------------------------------------------------------
    def __call__(self, cut: Cut) -> BuiltSequence:
        try:
            return self._build(cut, self.load_audio)
        except SkipSample as e:
            raise e.with_cut_id(cut.id)

    def count_tokens(self, cut: Cut) -> int:
        """Length of the built sequence, from the manifest alone (no audio is read)."""
        try:
            return len(self._build(cut, load_audio=False, check_length=False))
        except SkipSample as e:
            raise e.with_cut_id(cut.id)

    def dialog(self, cut: Cut) -> tuple[list[dict], bool]:
        """The cut as chat turns (``content`` of TTS/TTA answers as ids) and its thinking mode."""
        task = schema.get_task(cut)
        fmt = self.formatter
        if task == schema.TEXT:
            return schema.get_messages(cut), schema.is_thinking(cut)
        if task == schema.ASR:
            lang = schema.get_language(cut)
            question = asr_question(lang if schema.language_in_prompt(cut) else None)
            turns = [fmt.audio_content(question), asr_target(lang, schema.get_transcript(cut))]
        elif task == schema.AST:
            answer = ast_target(schema.get_language(cut), schema.get_transcript(cut), schema.get_translation(cut))
            turns = [fmt.audio_content(AST_PROMPT), answer]
        elif task == schema.AUDIO_QA:
            turns = [fmt.audio_content(schema.get_question(cut)), schema.get_answer(cut)]
        elif task == schema.TTS:
            pads = schema.get_cfg_uncond_pads(cut)
            voice = schema.get_voice_prompt(cut, self.vocab.speech_codebook_size)
            if pads:  # a CFG twin: the whole transcript (a voice prompt's too) is pads; the voice codes stay
                user = tts_user_content(num_pads=pads)
            else:
                text = schema.get_transcript(cut)
                user = tts_user_content(prompted_transcript(voice[1], text) if voice else text)
            if voice is None:
                turns = [user, self._speech_answer(cut)]
            else:  # VALL-E style: <speechgen_start> + reference codes open the answer, untrained
                prefix = voice_prefix_ids(self.vocab, voice[0])
                return [{"role": "user", "content": user},
                        {"role": "assistant", "content": self._speech_answer(cut)[1:], "prefix": prefix}], False
        else:  # TTA
            pads = schema.get_cfg_uncond_pads(cut)
            user = tta_user_content(num_pads=pads) if pads else tta_user_content(schema.get_caption(cut))
            turns = [user, self._audio_answer(cut)]
        return [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": turns[1]}], False

    def expand_sound(self, ids: list[int], num_audio_frames: list[int], name: str = "prompt") -> list[int]:
        """Replace the i-th ``<sound>`` of ``ids`` (e.g. a generation prompt) by ``<so_start>`` +
        ``num_audio_frames[i]`` x ``<so_embedding>`` + ``<so_end>``; a count mismatch raises :class:`SkipSample`."""
        return self._expand_sound(list(ids), [False] * len(ids), num_audio_frames, name)[0]

    # ---- internals -----------------------------------------------------------------------------
    def _speech_answer(self, cut: Cut) -> list[int]:
        codes = schema.get_speech_codes(cut, self.vocab.speech_codebook_size)
        return [self.vocab.speechgen_start, *self.vocab.speech_codes_to_ids(codes).tolist(), self.vocab.speechgen_end]

    def _audio_answer(self, cut: Cut) -> list[int]:
        codes = schema.get_audio_codes(cut, self.vocab.audio_codebook_size)
        if codes.shape[0] != self.vocab.audio_rvq_used:
            raise SkipSample(INVALID_CODEC_CODES, f"TTA codes have {codes.shape[0]} RVQ layers, the model generates "
                             f"{self.vocab.audio_rvq_used}", cut.id)
        if codes.shape[1] < self.tta_num_frames:
            raise SkipSample(INVALID_CODEC_CODES, f"TTA codes have {codes.shape[1]} frames, need {self.tta_num_frames} "
                             "(10 s): pre-tokenise with scripts/pretokenize.py, which pads TTA audio to 10 s", cut.id)
        ids = self.vocab.audio_codes_to_ids(codes[:, : self.tta_num_frames]).tolist()
        return [self.vocab.audiogen_start, *ids, self.vocab.audiogen_end]

    def _audio_inputs(self, cut: Cut, task: str, load_audio: bool) -> tuple[list[torch.Tensor], list[int]]:
        if task not in schema.AUDIO_INPUT_TASKS:
            return [], []
        if load_audio:
            wav = load_cut_audio(cut)
            return [wav], [self.frames_fn(int(wav.numel()))]
        if not cut.has_recording:
            raise SkipSample(MISSING_FIELD, f"task {task!r} needs audio but the cut has no recording", cut.id)
        n = compute_num_samples(cut.duration, SAMPLE_RATE)
        if n <= 0:
            raise SkipSample(ZERO_LENGTH_AUDIO, "the cut's duration is 0", cut.id)
        return [], [self.frames_fn(n)]

    def _build(self, cut: Cut, load_audio: bool, check_length: bool = True) -> BuiltSequence:
        cut = adapt_cut(cut)  # an input_cfg item's tags (own data: language, translation_field, ...)
        turns, thinking = self.dialog(cut)
        task = schema.get_task(cut)
        audios, frames = self._audio_inputs(cut, task, load_audio)
        tools = schema.get_tools(cut) if task == schema.TEXT else None
        try:
            pieces = self.formatter.pieces(turns, thinking, tools)
        except ValueError as e:
            raise SkipSample(INVALID_MESSAGES, str(e), cut.id) from None
        ids, trainable = self.formatter.encode_pieces(pieces)
        n_turns = len(turns) + (turns[0]["role"] != "system" and self.formatter.system_prompt is not None)
        tool_chat = is_tool_chat(turns, tools)  # its template groups tool turns; markers were refused in the text
        if not tool_chat and (ids.count(self.tokenizer.im_start) != n_turns or ids.count(self.tokenizer.im_end) != n_turns):
            raise SkipSample(INVALID_MESSAGES, "a message contains <|im_start|> or <|im_end|> and would break the "
                             "turn structure", cut.id)
        ids, trainable = self._expand_sound(ids, trainable, frames, cut.id)
        if check_length and self.max_length is not None and len(ids) > self.max_length:
            raise SkipSample(TOO_LONG_FOR_CONTEXT, f"{len(ids)} tokens > max_length {self.max_length}", cut.id)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = input_ids.masked_fill(~torch.tensor(trainable, dtype=torch.bool), IGNORE_INDEX)
        return BuiltSequence(input_ids, labels, audios, task, cut.id, frames)

    def _expand_sound(self, ids: list[int], trainable: list[bool], frames: list[int], cut_id: str):
        try:
            return expand_sound(ids, frames, self.tokenizer, trainable)
        except SoundPlaceholderError as e:
            raise SkipSample(AUDIO_PLACEHOLDER_MISMATCH, str(e), cut_id) from None


def _register_with_nemo() -> None:
    """Make ``prompt_format: audex`` work in NeMo's Lhotse dataloader (``pretokenize: true``): it calls this
    for every cut and attaches ``input_ids``/``context_ids``/``answer_ids``/``mask`` (audio sized from the
    manifest durations, not read)."""
    @registered_prompt_format_fn(Cut, AudexPromptFormatter)
    def audex_cut_prompt(cut: Cut, prompt: AudexPromptFormatter) -> dict[str, torch.Tensor]:
        seq = SequenceBuilder(prompt.tokenizer, prompt_format=prompt, system_prompt=prompt.system_prompt,
                              load_audio=False, max_length=None)(cut)
        mask = seq.labels.ne(IGNORE_INDEX)
        # the last trainable run is the answer (NeMo's answer_ids), everything before it is context
        untrained = (~mask).nonzero().flatten()
        last_start = int(untrained[-1]) + 1 if len(untrained) else 0
        return {"input_ids": seq.input_ids, "context_ids": seq.input_ids[:last_start],
                "answer_ids": seq.input_ids[last_start:], "mask": mask}


_register_with_nemo()
