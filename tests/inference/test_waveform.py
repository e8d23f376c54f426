"""Codes -> 16 kHz waveforms: chunked decoding with overlapping context matches the full decode; WAV files."""

import pytest
import soundfile as sf
import torch

from audex.inference.waveform import (
    ChunkedCodecDecoder,
    audio_tokens_to_codes,
    speech_tokens_to_codes,
    write_wav,
)

HOP = 320  # 16 kHz / 50 Hz


def test_chunked_decode_equals_full_decode_for_a_convolutional_codec(tiny_model):
    """X-Codec's decoder is convolutional: with the context covering its receptive field, chunks + crossfades
    reproduce the full-sequence decode, seams included."""
    codec = tiny_model.audio_codec
    codes = torch.randint(0, codec.codebook_size, (4, 730), generator=torch.Generator().manual_seed(0))
    full = codec.decode(codes)
    chunked = ChunkedCodecDecoder(codec.decode, HOP, chunk_frames=200, context_frames=25, crossfade_frames=5)(codes)
    assert chunked.shape == full.shape == (730 * HOP,)
    torch.testing.assert_close(chunked, full, atol=1e-6 * float(full.abs().max()), rtol=0)
    # without context the chunk edges differ from the full decode: the context is what makes them agree
    no_context = ChunkedCodecDecoder(codec.decode, HOP, chunk_frames=200, context_frames=0, crossfade_frames=0)(codes)
    seam = slice(200 * HOP - 2 * HOP, 200 * HOP + 2 * HOP)
    assert float((no_context[seam] - full[seam]).abs().max()) > 100 * float((chunked[seam] - full[seam]).abs().max())


def test_chunked_speech_decode_approaches_full_decode_with_more_context(tiny_model):
    """X-Codec2's decoder (attention + GroupNorm) sees the whole input: away from the edges the chunked
    decode converges to the full one as the context grows, and is exact once the context spans everything."""
    codec = tiny_model.speech_codec
    codes = torch.randint(0, codec.codebook_size, (900,), generator=torch.Generator().manual_seed(1))
    full = codec.decode(codes)
    inner = slice(100 * HOP, 800 * HOP)

    def rel_err(context):
        wav = ChunkedCodecDecoder(codec.decode, HOP, chunk_frames=150, context_frames=context, crossfade_frames=5)(codes)
        assert wav.shape == full.shape
        return float((wav[inner] - full[inner]).pow(2).mean().sqrt() / full[inner].pow(2).mean().sqrt())

    errors = [rel_err(c) for c in (5, 50, 300)]
    assert errors[0] > errors[1] > errors[2]
    assert rel_err(900) < 1e-5


def test_codes_from_generated_tokens(tiny_model):
    v = tiny_model.vocab
    speech = [v.speechgen_start, v.speech_offset + 3, v.speech_offset + 9, v.speechgen_end]
    assert speech_tokens_to_codes(v, speech).tolist() == [3, 9]
    codes = torch.arange(8).reshape(4, 2)
    ids = [v.audiogen_start, *v.audio_codes_to_ids(codes).tolist(), v.audiogen_end]
    assert torch.equal(audio_tokens_to_codes(v, ids), codes)
    with pytest.raises(ValueError, match="RVQ layer order"):
        audio_tokens_to_codes(v, [v.audio_layer_range(1).start] * 4)
    with pytest.raises(ValueError, match="holds no <speechcodec_i> tokens"):
        speech_tokens_to_codes(v, [v.speechgen_start, v.speechgen_end])


def test_write_wav_is_16khz_pcm(tmp_path):
    t = torch.arange(16000) / 16000
    wav = 0.5 * torch.sin(2 * torch.pi * 440 * t)
    path = write_wav(tmp_path / "a" / "tone.wav", torch.cat([wav, torch.tensor([3.0])]))
    data, sr = sf.read(path)
    info = sf.info(path)
    assert sr == 16000 and info.subtype == "PCM_16" and data.shape == (16001,)
    assert abs(data[:16000] - wav.numpy()).max() < 1e-4 and data[-1] == pytest.approx(1.0, abs=1e-4)  # clipped
