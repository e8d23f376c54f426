"""Audio input handling: anything in, 16 kHz mono float32 out, or a clear error naming the input.

Resampling uses lhotse's torch port of torchaudio's sinc resampler (``lhotse.augmentation.resample``), so no
torchaudio is needed; files are read with soundfile (WAV, FLAC, OGG, ...).

Example::

    wav = load_audio("speech_44k_stereo.wav")          # Tensor[T] at 16 kHz, mono
    wav = to_model_audio(np_array, sample_rate=8000, name="request 7")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from lhotse.augmentation.resample import resample

TARGET_SR = 16000


class AudioInputError(ValueError):
    """Raised for audio that cannot be used (empty, NaN/inf, wrong type or shape, unreadable)."""


def to_model_audio(audio, sample_rate: int, name: str = "audio") -> torch.Tensor:
    """Array-like ``[T]``, ``[C, T]`` or ``[T, C]`` (C <= 8 channels) at ``sample_rate`` -> Tensor[T'] 16 kHz mono."""
    if isinstance(audio, (str, bytes, dict)) or audio is None:
        raise AudioInputError(f"{name}: expected a waveform array, got {type(audio).__name__}")
    try:
        x = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    except Exception as e:  # lists of strings, ragged lists, ...
        raise AudioInputError(f"{name}: cannot read as a waveform array ({e})") from None
    if not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int8, torch.uint8)):
        raise AudioInputError(f"{name}: waveform dtype {x.dtype} is not audio (use float or int16/int32 PCM)")
    if x.dtype == torch.int16:
        x = x.float() / 32768.0
    elif x.dtype == torch.int32:
        x = x.float() / 2147483648.0
    elif x.dtype in (torch.int8, torch.uint8):
        x = (x.float() - (128.0 if x.dtype == torch.uint8 else 0.0)) / 128.0
    x = x.float()
    if x.dim() == 2:
        channel_axis = 0 if x.shape[0] <= x.shape[1] else 1
        if x.shape[channel_axis] > 8:
            raise AudioInputError(f"{name}: shape {tuple(x.shape)} has no channel axis of at most 8 channels")
        x = x.mean(dim=channel_axis)  # stereo / multichannel -> mono
    elif x.dim() != 1:
        raise AudioInputError(f"{name}: waveform must be [T] or [channels, T], got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise AudioInputError(f"{name}: the audio is empty (0 samples)")
    if not torch.isfinite(x).all():
        raise AudioInputError(f"{name}: the audio contains NaN or inf samples")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioInputError(f"{name}: sample_rate must be a positive integer, got {sample_rate!r}")
    if sample_rate != TARGET_SR:
        x = resample(x.unsqueeze(0), int(sample_rate), TARGET_SR).squeeze(0)
    return x.contiguous()


def load_audio(path: str | os.PathLike, name: str | None = None) -> torch.Tensor:
    """Read an audio file and return it as 16 kHz mono float32."""
    name = name or str(path)
    p = Path(path)
    if not p.exists():
        raise AudioInputError(f"{name}: file not found")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioInputError(f"{name}: not a readable audio file ({e})") from None
    return to_model_audio(data.T, sr, name)
