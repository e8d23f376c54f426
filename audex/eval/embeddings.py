"""Embedding models behind the Fréchet distance (TTA) and speaker similarity (TTS), all loaded locally.

Fréchet distance (:class:`AudioEmbedder`): the paper reports FD_openl3 — OpenL3 embeddings (``mel256``,
512-d, content type ``env`` for AudioCaps or ``music`` for SongDescriber, one frame every 0.5 s, as in
Stable Audio's metrics) pooled over all frames of all clips. Choose with ``kind``:

* ``openl3``: the ``openl3`` package, whose weights ship inside the package (no download). Reported as
  ``fd_openl3`` and compared with Table 7.
* ``logmel``: a local fallback that needs no weights: per 1 s window (0.5 s hop, as OpenL3) the mean and
  standard deviation over time of a 64-band log-mel spectrogram (transformers' ``audio_utils``), 128-d.
  Reported as ``fd_logmel`` and labelled **fallback, not comparable with FD_openl3** in every summary.
* ``auto``: ``openl3`` if it imports, else ``logmel``.

Speaker similarity (:class:`SpeakerEmbedder`): any local Hugging Face x-vector model
(``AutoModelForAudioXVector``: WavLM/UniSpeech-SAT/Wav2Vec2 ``...ForXVector``, e.g. a copy of
``microsoft/wavlm-base-plus-sv``); SIM is the cosine of the two embeddings, x100 as in Table 6.

Example::

    embedder = build_audio_embedder({"kind": "auto", "content_type": "env"})
    frames = embedder.embed(wav_16k)            # [n_frames, D]
    speaker = SpeakerEmbedder("/models/wavlm-base-plus-sv")
    sim = cosine_similarity(speaker.embed(generated), speaker.embed(prompt_audio))
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModelForAudioXVector
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

SAMPLE_RATE = 16000


class AudioEmbedder:
    """Frame embeddings of a 16 kHz waveform, ``[n_frames, D]``; subclasses set the labels below."""

    name: str = ""
    metric: str = ""  # summary metric name, e.g. "fd_openl3"
    is_fallback: bool = False
    description: str = ""

    def embed(self, wav: torch.Tensor) -> np.ndarray:
        raise NotImplementedError


class OpenL3Embedder(AudioEmbedder):
    name, metric = "openl3", "fd_openl3"

    def __init__(self, content_type: str = "env", input_repr: str = "mel256", embedding_size: int = 512,
                 hop_size: float = 0.5):
        try:
            import openl3
        except ImportError:
            raise ImportError("the openl3 package is not installed: pip install openl3 (its weights ship with the "
                              "package), or set the embedding kind to 'logmel' (a fallback, not comparable with the paper)") from None
        self._openl3 = openl3
        self.hop_size = float(hop_size)
        self.model = openl3.models.load_audio_embedding_model(input_repr=input_repr, content_type=content_type,
                                                              embedding_size=embedding_size)
        self.description = f"OpenL3 ({input_repr}, {content_type}, {embedding_size}-d, hop {hop_size} s)"

    def embed(self, wav: torch.Tensor) -> np.ndarray:
        emb, _ = self._openl3.get_audio_embedding(wav.detach().cpu().numpy(), SAMPLE_RATE, model=self.model,
                                                  hop_size=self.hop_size, center=True, verbose=False)
        return np.asarray(emb, dtype=np.float64)


class LogMelStatsEmbedder(AudioEmbedder):
    """Weight-free fallback: mean and std of a log-mel spectrogram over 1 s windows every 0.5 s.

    Hand-written because no installable library gives OpenL3-like frame embeddings without downloading
    weights; it measures spectral-distribution distance only and its values are on a different scale.
    """

    name, metric, is_fallback = "logmel", "fd_logmel", True

    def __init__(self, num_mel_bins: int = 64, window_seconds: float = 1.0, hop_seconds: float = 0.5):
        self.n_fft, self.frame_hop = 400, 160  # 25 ms windows, 10 ms hop
        self.window = window_function(self.n_fft, "hann")
        self.mel_filters = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=num_mel_bins,
                                           min_frequency=0.0, max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE,
                                           norm="slaney", mel_scale="slaney")
        self.window_frames = int(round(window_seconds * SAMPLE_RATE / self.frame_hop))
        self.hop_frames = int(round(hop_seconds * SAMPLE_RATE / self.frame_hop))
        self.description = (f"log-mel statistics ({num_mel_bins} bands, mean+std over {window_seconds:g} s windows, "
                            f"hop {hop_seconds:g} s) — FALLBACK, not OpenL3")

    def embed(self, wav: torch.Tensor) -> np.ndarray:
        x = wav.detach().cpu().double().numpy().reshape(-1)
        if x.size < self.n_fft:
            x = np.pad(x, (0, self.n_fft - x.size))
        logmel = spectrogram(x, self.window, frame_length=self.n_fft, hop_length=self.frame_hop, power=2.0,
                             mel_filters=self.mel_filters, log_mel="log10", mel_floor=1e-10, dtype=np.float64).T
        if logmel.shape[0] < self.window_frames:
            logmel = np.pad(logmel, ((0, self.window_frames - logmel.shape[0]), (0, 0)), mode="edge")
        starts = range(0, logmel.shape[0] - self.window_frames + 1, self.hop_frames)
        return np.stack([np.concatenate([logmel[s: s + self.window_frames].mean(0), logmel[s: s + self.window_frames].std(0)])
                         for s in starts])


def build_audio_embedder(cfg: Mapping | None = None) -> AudioEmbedder:
    """``cfg``: ``kind`` (auto | openl3 | logmel) and the chosen model's options (``content_type``, ...)."""
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "auto")
    openl3_keys = {"content_type", "input_repr", "embedding_size", "hop_size"}
    if kind == "auto":
        kind = "openl3" if importlib.util.find_spec("openl3") is not None else "logmel"
    if kind == "openl3":
        return OpenL3Embedder(**{k: v for k, v in cfg.items() if k in openl3_keys})
    if kind == "logmel":
        return LogMelStatsEmbedder(**{k: v for k, v in cfg.items() if k in {"num_mel_bins", "window_seconds", "hop_seconds"}})
    raise ValueError(f"unknown embedding kind {kind!r}: use auto, openl3 or logmel")


class SpeakerEmbedder:
    """x-vector speaker embeddings from a local Hugging Face folder (``AutoModelForAudioXVector``)."""

    def __init__(self, pretrained_path: str, device: str | torch.device = "cpu"):
        path = Path(pretrained_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"speaker model folder {str(path)!r} has no config.json: give a local Hugging Face "
                                    "x-vector model folder (e.g. a copy of microsoft/wavlm-base-plus-sv)")
        self.model = AutoModelForAudioXVector.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        self.name = path.name

    @torch.no_grad()
    def embed_batch(self, wavs: list[torch.Tensor]) -> np.ndarray:
        feats = self.feature_extractor([w.detach().cpu().numpy() for w in wavs], sampling_rate=SAMPLE_RATE,
                                       return_tensors="pt", padding=True, return_attention_mask=True)
        dev = next(self.model.parameters()).device
        out = self.model(input_values=feats["input_values"].to(dev), attention_mask=feats["attention_mask"].to(dev))
        return out.embeddings.float().cpu().numpy()

    def embed(self, wav: torch.Tensor) -> np.ndarray:
        return self.embed_batch([wav])[0]
