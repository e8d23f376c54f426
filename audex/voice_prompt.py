"""Voice-prompted TTS: a reference clip and its transcript condition the speech (Table 6's "prompting" column).

The paper measures TTS with a voice prompt before its release stage fine-tunes on fixed-voice data so that
prompting no longer works (footnote 4). Audex writes a prompted example in the fixed-voice template of
appendix A.6, VALL-E style (continuation)::

    <|im_start|>user
    <|text to speech|> Generate speech for this transcription. {voice_text} {text}<|im_end|>
    <|im_start|>assistant
    <think></think>
    <speechgen_start> {reference codes} | {target codes} <speechgen_end><|im_end|>
    ^ context (not trained) ^^^^^^^^^^^^ | ^ trained ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

* the transcript is the reference's followed by the target's, and the answer opens with the reference's X-Codec2
  codes: the model continues one codec stream whose first part is the prompt speaker saying the first part of
  the text, which is what VALL-E and Seed-TTS's continuation mode do. It needs no new token and no new turn, and
  fixed-voice TTS is the same template with an empty prompt, so both forms are one task to the model;
* ``<speechgen_start>`` and the reference codes are teacher-forced context (inference writes them into the
  prompt), so only the target codes, ``<speechgen_end>`` and ``<|im_end|>`` are trained;
* the CFG twin (training copies of :mod:`audex.data.cfg_uncond` and the unconditional row at inference) drops
  the whole transcript, reference part included, for ``<pad>`` s and **keeps the reference codes**: guidance
  then amplifies what the text adds (intelligibility) while both rows speak in the prompt's voice, rather than
  extrapolating away from a voice-less row;
* manifests: a TTS cut's ``custom["voice_codes"]`` (base64 speech codes of the reference, like
  ``speech_codes``) and ``custom["voice_text"]`` (its transcript), both or neither
  (:func:`audex.data.schema.make_tts_cut`).

Example::

    >>> prompted_transcript("He hoped there would be stew.", "Good evening.")
    'He hoped there would be stew. Good evening.'
    >>> pipe.tts(["Good evening."], voice=reference_wav, voice_text="He hoped there would be stew.")
"""

from __future__ import annotations

from typing import Sequence

import torch

from audex.prompts import tts_user_content


def prompted_transcript(voice_text: str, text: str) -> str:
    """The user-turn transcript of a prompted example: the reference's words, then the target's."""
    if not isinstance(voice_text, str) or not voice_text.strip():
        raise ValueError(f"voice_text (the transcript of the voice prompt) must be a non-empty string, got {voice_text!r}")
    return f"{voice_text.strip()} {text.strip()}"


def voice_prefix_ids(vocab, voice_codes: torch.Tensor | Sequence[int]) -> list[int]:
    """The teacher-forced opening of a prompted answer: ``<speechgen_start>`` + the reference's speech-token ids."""
    codes = torch.as_tensor(voice_codes, dtype=torch.long).reshape(-1)
    if codes.numel() == 0:
        raise ValueError("the voice prompt has no speech codes")
    return [vocab.speechgen_start, *vocab.speech_codes_to_ids(codes).tolist()]


def prompted_tts_content(voice_text: str):
    """``content_fn(text=None, num_pads=None)`` of a prompted TTS user turn (for
    :func:`audex.inference.pipelines.generation_prompts`): the reference's transcript before the text; the CFG
    twin's pads stand for both."""
    def content(text: str | None = None, num_pads: int | None = None) -> str:
        if num_pads:
            return tts_user_content(num_pads=num_pads)
        return tts_user_content(prompted_transcript(voice_text, text))
    return content


def encode_voice_prompts(speech_codec, n: int, voice, voice_text) -> list[tuple[torch.Tensor, str]] | None:
    """Per text ``(reference speech codes [T], reference transcript)``, or None without a prompt. ``voice`` is one
    16 kHz waveform (float) or X-Codec2 codes (integer) for all ``n`` texts, or a list of one per text;
    ``voice_text`` likewise. Waveforms are encoded with ``speech_codec`` once each."""
    if voice is None and voice_text is None:
        return None
    if voice is None or voice_text is None:
        raise ValueError("a voice prompt needs both voice (the reference audio) and voice_text (its transcript)")
    voices = [voice] * n if isinstance(voice, torch.Tensor) else list(voice)
    texts = [voice_text] * n if isinstance(voice_text, str) else list(voice_text)
    if len(voices) != n or len(texts) != n:
        raise ValueError(f"give one voice and voice_text for all {n} texts or one per text; got {len(voices)} "
                         f"voices and {len(texts)} voice_texts")
    encoded: dict[int, torch.Tensor] = {}
    for v in voices:
        if id(v) in encoded:
            continue
        t = torch.as_tensor(v)
        if t.is_floating_point():
            if speech_codec is None:
                raise RuntimeError("this model has no speech_codec: configure model.speech_codec to encode a voice "
                                   "prompt (or pass its X-Codec2 codes)")
            if t.numel() == 0:
                raise ValueError("the voice prompt waveform is empty")
            encoded[id(v)] = speech_codec.encode(t.reshape(-1)).reshape(-1).long()
        else:
            encoded[id(v)] = t.reshape(-1).long()
    return [(encoded[id(v)], w) for v, w in zip(voices, texts)]
