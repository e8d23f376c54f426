"""Speech and audio codecs: frozen tools that turn waveforms into codec tokens and back.

* :class:`SpeechCodec` wraps transformers' ``Xcodec2Model`` (X-Codec2: 16 kHz, 50 Hz, one FSQ codebook of
  4^8 = 65,536 codes) -> 50 tokens per second.
* :class:`AudioCodec` wraps transformers' ``XcodecModel`` (X-Codec: 16 kHz, 50 Hz, 8-layer RVQ x 1,024), of
  which Audex generates the first 4 layers -> 200 tokens per second once flattened frame-major.

Neither takes part in the LLM's forward pass: they encode training targets offline
(``scripts/pretokenize.py``) and decode generated tokens to waveforms.

Each is built from a local ``pretrained_path`` (Hugging Face layout) or an inline ``config`` (random
init, for tests and the CPU demo)::

    codec = SpeechCodec(config=dict(hidden_size=64, ...))
    codes = codec.encode(torch.randn(16000))      # LongTensor[50]
    wav = codec.decode(codes)                      # Tensor[16000]

Why the X-Codec2 semantic features are not computed by ``Xcodec2FeatureExtractor``: that class needs
torchaudio (``torchaudio.compliance.kaldi.fbank``), and no torchaudio wheel matches torch 2.13. We use
``SeamlessM4TFeatureExtractor`` instead, the numpy implementation of the same Kaldi fbank (80 bins, stride 2)
that the original X-Codec2 used, and pad the waveform to a multiple of the hop ourselves.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import SeamlessM4TFeatureExtractor, Xcodec2Config, Xcodec2Model, XcodecConfig, XcodecModel

from audex.audio import to_model_audio

SAMPLE_RATE = 16000


def _check_wave(wav: torch.Tensor, who: str) -> torch.Tensor:
    return to_model_audio(wav, SAMPLE_RATE, name=f"{who}.encode input")


def _load_pretrained(model_cls, path: str):
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"codec folder {path!r} does not exist: give a local Hugging Face folder (no downloads)")
    return model_cls.from_pretrained(str(p), local_files_only=True)


class SpeechCodec(nn.Module):
    """X-Codec2 speech codec (frozen)."""

    frame_rate = 50
    sample_rate = SAMPLE_RATE

    def __init__(self, pretrained_path: str | None = None, config: dict | None = None):
        super().__init__()
        if pretrained_path:
            self.model = _load_pretrained(Xcodec2Model, pretrained_path)
        else:
            self.model = Xcodec2Model(Xcodec2Config(**dict(config or {})))
        self.model.eval().requires_grad_(False)
        self.hop_length = int(self.model.config.hop_length)
        if self.sample_rate // self.hop_length != self.frame_rate:
            raise ValueError(f"X-Codec2 hop length {self.hop_length} does not give {self.frame_rate} Hz at 16 kHz")
        self.codebook_size = int(np.prod(self.model.config.quantization_levels))
        self._fbank = SeamlessM4TFeatureExtractor(feature_size=80, num_mel_bins=80, stride=2, sampling_rate=SAMPLE_RATE)

    def train(self, mode: bool = True):  # a frozen tool stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz waveform [T] -> codes LongTensor[ceil(T / 320)] in [0, codebook_size)."""
        wav = _check_wave(wav, "SpeechCodec")
        n_frames = math.ceil(wav.numel() / self.hop_length)
        padded = torch.nn.functional.pad(wav, (0, n_frames * self.hop_length - wav.numel()))
        # semantic branch: Kaldi fbank of the hop-padded audio, half a hop of context each side
        sem_in = torch.nn.functional.pad(padded, (self.hop_length // 2, self.hop_length // 2)).numpy()
        feats = self._fbank(sem_in, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=False)
        dev = next(self.model.parameters()).device
        out = self.model.encode(
            input_values=padded.view(1, 1, -1).to(dev),
            input_features=feats["input_features"].to(dev),
        )
        codes = out.audio_codes.reshape(-1)
        return codes[:n_frames].long().cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [T_frames] -> waveform [T_frames * 320] at 16 kHz."""
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(1, 1, -1)
        if codes.numel() == 0:
            raise ValueError("SpeechCodec.decode got no codes")
        if int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(f"speech codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        dev = next(self.model.parameters()).device
        wav = self.model.decode(codes.to(dev)).audio_values.reshape(-1).float().cpu()
        return wav[: codes.shape[-1] * self.hop_length]


class AudioCodec(nn.Module):
    """X-Codec general-audio codec (frozen); generates with the first ``n_q`` RVQ layers."""

    frame_rate = 50
    sample_rate = SAMPLE_RATE

    def __init__(self, pretrained_path: str | None = None, config: dict | None = None, n_q: int = 4):
        super().__init__()
        if pretrained_path:
            self.model = _load_pretrained(XcodecModel, pretrained_path)
        else:
            self.model = XcodecModel(XcodecConfig(**dict(config or {})))
            self._init_random_codebooks()
        self.model.eval().requires_grad_(False)
        self.n_q = int(n_q)
        self.codebook_size = int(self.model.config.codebook_size)
        self.hop_length = int(self.model.config.hop_length)
        if self.sample_rate // self.hop_length != self.frame_rate:
            raise ValueError(f"X-Codec hop length {self.hop_length} does not give {self.frame_rate} Hz at 16 kHz")
        bw_per_q = self.model.quantizer.get_bandwidth_per_quantizer()
        self.bandwidth = next(
            (b for b in sorted(self.model.config.target_bandwidths) if int(math.floor(b / bw_per_q + 1e-6)) >= self.n_q), None
        )
        if self.bandwidth is None:
            raise ValueError(f"this X-Codec has no target bandwidth giving {self.n_q} RVQ layers: "
                             f"{list(self.model.config.target_bandwidths)} at {bw_per_q} kbps per layer")

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def _init_random_codebooks(self):
        # transformers zero-fills the RVQ codebooks (buffers that real checkpoints overwrite); a randomly
        # initialised codec needs distinct code vectors, or every frame maps to code 0.
        std = self.model.config.initializer_range
        for layer in self.model.quantizer.quantizers:
            layer.codebook.embed.normal_(0.0, std)
            layer.codebook.embed_avg.copy_(layer.codebook.embed)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz waveform [T] -> codes LongTensor[n_q, ceil(T / 320)]."""
        wav = _check_wave(wav, "AudioCodec")
        n_frames = math.ceil(wav.numel() / self.hop_length)
        padded = torch.nn.functional.pad(wav, (0, n_frames * self.hop_length - wav.numel()))
        dev = next(self.model.parameters()).device
        codes = self.model.encode(padded.view(1, 1, -1).to(dev), bandwidth=self.bandwidth).audio_codes
        return codes[0, : self.n_q, :n_frames].long().cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [n_q, T_frames] -> waveform [T_frames * 320] at 16 kHz."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.dim() != 2 or codes.shape[0] != self.n_q or codes.shape[1] == 0:
            raise ValueError(f"AudioCodec.decode expects codes [{self.n_q}, T>0], got {tuple(codes.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(f"audio codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        dev = next(self.model.parameters()).device
        wav = self.model.decode(codes.unsqueeze(0).to(dev)).audio_values.reshape(-1).float().cpu()
        return wav[: codes.shape[-1] * self.hop_length]
