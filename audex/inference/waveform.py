"""Generated codec tokens -> 16 kHz waveforms -> WAV files.

Speech tokens (``<speechcodec_i>``) go to the X-Codec2 decoder, audio tokens (``<audiocodec_i>``, RVQ
frame-major) to the X-Codec decoder (:mod:`audex.modules.codecs`).

Long speech is decoded in chunks with overlapping context (:class:`ChunkedCodecDecoder`): each chunk of
``chunk_frames`` is decoded together with ``context_frames`` of its neighbours on both sides, only its own
span is kept, and consecutive spans overlap by ``crossfade_frames`` joined with a linear crossfade.
This bounds memory and the codec's attention length (X-Codec2's RoPE table covers 4,096 frames, 82 s), and
makes the seams inaudible: a convolutional decoder (X-Codec's) gives the full-sequence result exactly once
the context covers its receptive field; X-Codec2's transformer and GroupNorm layers see the whole input, so
there the result converges to the full decode as the context grows, and the crossfade hides what remains.
The codecs' own libraries decode only whole sequences, hence this small wrapper.

Example::

    >>> wav = speech_tokens_to_waveform(model, token_ids)            # Tensor[T] at 16 kHz
    >>> write_wav("out.wav", wav)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import soundfile as sf
import torch

SAMPLE_RATE = 16000


class ChunkedCodecDecoder:
    """Decode ``codes [..., T_frames]`` to ``[T_frames * hop]`` samples in overlapping chunks.

    Args:
        decode: ``codes[..., t] -> samples[t * hop]`` (``SpeechCodec.decode`` / ``AudioCodec.decode``).
        hop_length: samples per codec frame (320 at 16 kHz / 50 Hz).
        chunk_frames: frames each chunk contributes (500 = 10 s).
        context_frames: extra frames decoded on each side of a chunk and thrown away (100 = 2 s).
        crossfade_frames: overlap between consecutive chunks' outputs (5 = 100 ms).

    Example::

        >>> dec = ChunkedCodecDecoder(model.speech_codec.decode, hop_length=320)
        >>> wav = dec(codes)                           # codes: LongTensor[T]
    """

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], hop_length: int = 320,
                 chunk_frames: int = 500, context_frames: int = 100, crossfade_frames: int = 5):
        if chunk_frames <= 0 or context_frames < 0 or crossfade_frames < 0:
            raise ValueError("chunk_frames must be > 0; context_frames and crossfade_frames >= 0")
        if crossfade_frames > min(chunk_frames, context_frames):
            raise ValueError(f"crossfade_frames={crossfade_frames} must not exceed chunk_frames ({chunk_frames}) "
                             f"or context_frames ({context_frames}): the overlap is decoded from the context")
        self.decode = decode
        self.hop = int(hop_length)
        self.chunk_frames = int(chunk_frames)
        self.context_frames = int(context_frames)
        self.crossfade_frames = int(crossfade_frames)

    def _decode_span(self, codes: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Samples of frames ``[start, stop)``, decoded with context around them."""
        total = codes.shape[-1]
        lo, hi = max(0, start - self.context_frames), min(total, stop + self.context_frames)
        wav = self.decode(codes[..., lo:hi]).reshape(-1)
        return wav[(start - lo) * self.hop : (stop - lo) * self.hop]

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        total = codes.shape[-1]
        if total == 0:
            raise ValueError("no codec frames to decode")
        if total <= self.chunk_frames + self.context_frames:
            return self.decode(codes).reshape(-1)[: total * self.hop]
        n_chunks = math.ceil(total / self.chunk_frames)
        fade = self.crossfade_frames * self.hop
        # linear (equal-gain) crossfade, fade_in + fade_out = 1: both sides decode the same frames, so they
        # are correlated and an equal-power fade would swell the seam by up to 3 dB
        fade_in = torch.linspace(0.0, 1.0, fade + 2)[1:-1] if fade else torch.zeros(0)
        fade_out = 1.0 - fade_in
        out = torch.zeros(total * self.hop)
        for i in range(n_chunks):
            start, stop = i * self.chunk_frames, min(total, (i + 1) * self.chunk_frames)
            span_start = max(0, start - self.crossfade_frames) if i else start
            wav = self._decode_span(codes, span_start, stop).to(out.dtype)
            a = span_start * self.hop
            if i and fade:
                out[a : a + fade] = out[a : a + fade] * fade_out + wav[:fade] * fade_in
                out[a + fade : stop * self.hop] = wav[fade:]
            else:
                out[a : stop * self.hop] = wav
        return out


# ---- tokens -> waveforms ------------------------------------------------------------------------
def _require_codec(model, name: str):
    codec = getattr(model, name, None)
    if codec is None:
        raise RuntimeError(f"this model has no {name} (model.{name} is null): configure one to decode generated tokens")
    return codec


def _codec_span(token_ids: Sequence[int], start: int, end: int, what: str) -> torch.Tensor:
    """The ids between a span's start and end markers (either may be absent: prompt-forced or cut off)."""
    ids = [int(t) for t in token_ids]
    if start in ids:
        ids = ids[ids.index(start) + 1 :]
    if end in ids:
        ids = ids[: ids.index(end)]
    if not ids:
        raise ValueError(f"the generated turn holds no {what} tokens")
    return torch.tensor(ids)


def speech_tokens_to_codes(vocab, token_ids: Sequence[int]) -> torch.Tensor:
    """Generated tokens of a speech turn -> X-Codec2 codes ``[T]``."""
    return vocab.ids_to_speech_codes(_codec_span(token_ids, vocab.speechgen_start, vocab.speechgen_end,
                                                 "<speechcodec_i>"))


def audio_tokens_to_codes(vocab, token_ids: Sequence[int]) -> torch.Tensor:
    """Generated tokens of an audio turn -> X-Codec RVQ codes ``[n_q, T]`` (checks the layer order)."""
    return vocab.ids_to_audio_codes(_codec_span(token_ids, vocab.audiogen_start, vocab.audiogen_end, "<audiocodec_i>"))


def speech_tokens_to_waveform(model, token_ids: Sequence[int], chunk_seconds: float = 10.0,
                              context_seconds: float = 2.0, crossfade_seconds: float = 0.1) -> torch.Tensor:
    """Speech tokens -> 16 kHz waveform, decoded in overlapping chunks (see :class:`ChunkedCodecDecoder`)."""
    codec = _require_codec(model, "speech_codec")
    codes = speech_tokens_to_codes(model.vocab, token_ids)
    fps = codec.frame_rate
    decoder = ChunkedCodecDecoder(codec.decode, codec.hop_length, chunk_frames=round(chunk_seconds * fps),
                                  context_frames=round(context_seconds * fps),
                                  crossfade_frames=round(crossfade_seconds * fps))
    return decoder(codes)


def audio_tokens_to_waveform(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Audio tokens (2,000 for 10 s) -> 16 kHz waveform (500 frames x 320 samples = 160,000)."""
    codec = _require_codec(model, "audio_codec")
    return codec.decode(audio_tokens_to_codes(model.vocab, token_ids))


def write_wav(path: str | Path, wav: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> Path:
    """Float waveform ``[T]`` -> 16-bit PCM WAV (peaks above full scale are clipped, not wrapped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = torch.as_tensor(wav, dtype=torch.float32).reshape(-1).clamp(-1.0, 1.0).numpy()
    sf.write(str(path), samples, sample_rate, subtype="PCM_16")
    return path
