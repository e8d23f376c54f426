"""AF-Whisper audio encoder: waveforms -> 30 s windows -> Whisper encoder -> 25 Hz features.

Wraps transformers' ``AudioFlamingo3Encoder`` (Whisper-large-v3 architecture: 128 mel bins, 32 layers,
d=1280, then an average pool of 2) and ``WhisperFeatureExtractor``. Audio is cut into windows of
``window_seconds`` (30 s in the paper), the last one zero-padded to a full window (section 3.2), so every
window yields exactly ``window_seconds * 25`` frames (750 for 30 s)::

    enc = AudexAudioEncoder(config=dict(num_hidden_layers=2, hidden_size=64, ...))
    feats = enc([torch.randn(16000 * 31)])       # one 31 s clip -> 2 windows
    feats[0].shape                                # torch.Size([1500, 64])

The windowing is Audex's (the paper's) own; transformers' AF3 processor instead truncates/streams, hence
the small hand-written splitter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AudioFlamingo3Encoder, AudioFlamingo3EncoderConfig, WhisperFeatureExtractor

from audex.audio import to_model_audio

SAMPLE_RATE = 16000
HOP_LENGTH = 160  # Whisper mel hop (10 ms)
ENCODER_DOWNSAMPLE = 4  # conv stride 2, then average pool 2 -> 25 Hz
PAPER_WINDOW_SECONDS = 30.0


def frames_per_window(window_seconds: float = PAPER_WINDOW_SECONDS) -> int:
    """Encoder frames of one window: ``window_seconds x 25`` (750 for the paper's 30 s)."""
    window_samples = int(round(float(window_seconds) * SAMPLE_RATE))
    if window_samples <= 0 or window_samples % (HOP_LENGTH * ENCODER_DOWNSAMPLE):
        raise ValueError(f"window_seconds={window_seconds} must be a positive multiple of 0.04 s (one 25 Hz frame)")
    return window_samples // (HOP_LENGTH * ENCODER_DOWNSAMPLE)


def encoder_frames(num_samples: int, window_samples: int = int(PAPER_WINDOW_SECONDS * SAMPLE_RATE),
                   frames_per_window: int = 750) -> int:
    """THE window->frames formula: a clip of ``num_samples`` (16 kHz) is cut into windows, the last one
    zero-padded, so it gives ``ceil(num_samples / window_samples) x frames_per_window`` frames (31 s -> 1,500)."""
    if num_samples <= 0:
        raise ValueError(f"audio must have at least one sample, got {num_samples}")
    return math.ceil(num_samples / window_samples) * frames_per_window


@dataclass(frozen=True)
class WindowedFrames:
    """:func:`encoder_frames` with a fixed framing, as a picklable ``frames_fn`` (dataloader workers should not
    pickle the model).

    Example::

        >>> WindowedFrames()(16000 * 31)
        1500
    """

    window_samples: int = int(PAPER_WINDOW_SECONDS * SAMPLE_RATE)
    frames_per_window: int = 750

    @classmethod
    def from_model(cls, model) -> "WindowedFrames":
        enc = model.audio_encoder
        return cls(int(enc.window_samples), int(enc.frames_per_window))

    def __call__(self, num_samples: int) -> int:
        return encoder_frames(num_samples, self.window_samples, self.frames_per_window)


class AudexAudioEncoder(nn.Module):
    """AF-Whisper encoder with 30 s windowing.

    Args:
        pretrained_path: local folder with an ``AudioFlamingo3Encoder`` (``model_type: audioflamingo3_encoder``)
            or a full AudioFlamingo3 checkpoint, whose ``audio_tower.*`` weights are taken.
        config: ``AudioFlamingo3EncoderConfig`` kwargs for a randomly initialised encoder.
        window_seconds: window length (30 in the paper); ``max_source_positions`` must equal
            ``window_seconds * 50``.
        encoder_batch_size: windows per encoder call (bounds memory on long audio).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, pretrained_path: str | None = None, config: dict | None = None, window_seconds: float = 30.0,
                 encoder_batch_size: int = 8):
        super().__init__()
        self.window_seconds = float(window_seconds)
        self.window_samples = int(round(self.window_seconds * SAMPLE_RATE))
        self.frames_per_window = frames_per_window(self.window_seconds)
        self.encoder_batch_size = int(encoder_batch_size)
        if pretrained_path:
            self.encoder = self._load_pretrained(pretrained_path)
        else:
            cfg = dict(config or {})
            cfg.setdefault("max_source_positions", self.frames_per_window * 2)
            self.encoder = AudioFlamingo3Encoder(AudioFlamingo3EncoderConfig(**cfg))
        if self.encoder.config.max_source_positions != self.frames_per_window * 2:
            raise ValueError(
                f"encoder max_source_positions={self.encoder.config.max_source_positions} does not match a "
                f"{self.window_seconds} s window (needs {self.frames_per_window * 2})"
            )
        self.hidden_size = int(self.encoder.config.hidden_size)
        self.num_mel_bins = int(self.encoder.config.num_mel_bins)
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=self.num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH,
            chunk_length=max(1, int(self.window_seconds)),
        )
        # exact window in samples (chunk_length is an int in transformers; windows may be fractional seconds)
        self.feature_extractor.n_samples = self.window_samples
        self.feature_extractor.nb_max_frames = self.window_samples // HOP_LENGTH

    def _load_pretrained(self, path: str):
        folder = Path(path)
        cfg_file = folder / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"audio encoder folder {path!r} has no config.json (expected a local Hugging Face folder)")
        raw = json.loads(cfg_file.read_text())
        if raw.get("model_type") == "audioflamingo3":  # full AF3 checkpoint: take its audio tower
            enc = AudioFlamingo3Encoder(AudioFlamingo3EncoderConfig(**raw["audio_config"]))
            state = {}
            for f in sorted(folder.glob("*.safetensors")):
                for k, v in load_file(str(f)).items():
                    if k.startswith("audio_tower."):
                        state[k[len("audio_tower."):]] = v
            missing, unexpected = enc.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"AF3 checkpoint {path!r} lacks audio_tower weights: {missing[:5]} ...")
            return enc
        return AudioFlamingo3Encoder.from_pretrained(str(folder), local_files_only=True)

    def frames_for_samples(self, num_samples: int) -> int:
        """Encoder frames for a clip of ``num_samples``: :func:`encoder_frames` with this encoder's window."""
        return encoder_frames(num_samples, self.window_samples, self.frames_per_window)

    def _features(self, windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.feature_extractor(
            [w.numpy() for w in windows], sampling_rate=SAMPLE_RATE, return_tensors="pt",
            padding="max_length", return_attention_mask=True,
        )
        return feats["input_features"], feats["attention_mask"]

    def forward(self, waveforms: list[torch.Tensor]) -> list[torch.Tensor]:
        """List of mono 16 kHz waveforms -> list of ``[frames_for_samples(T_i), hidden]`` features."""
        windows, owners = [], []
        for i, wav in enumerate(waveforms):
            wav = to_model_audio(wav, SAMPLE_RATE, name=f"audio[{i}]")  # rejects empty / NaN / non-audio input
            n = wav.numel()
            for start in range(0, n, self.window_samples):
                windows.append(wav[start: start + self.window_samples].detach().float().cpu())
                owners.append(i)
        if not windows:
            return []
        dev = next(self.encoder.parameters()).device
        dtype = next(self.encoder.parameters()).dtype
        outs = []
        for s in range(0, len(windows), self.encoder_batch_size):
            feats, mask = self._features(windows[s: s + self.encoder_batch_size])
            out = self.encoder(input_features=feats.to(dev, dtype), input_features_mask=mask.to(dev)).last_hidden_state
            outs.append(out)
        frames = torch.cat(outs, dim=0)  # [n_windows, frames_per_window, hidden]
        result = []
        owners_t = torch.tensor(owners)
        for i in range(len(waveforms)):
            result.append(frames[owners_t == i].reshape(-1, self.hidden_size))
        return result
