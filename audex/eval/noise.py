"""Noisy speech for the noisy-ASR benchmark (Table 9): clean utterances mixed with noise at a chosen SNR.

Appendix A.7: each LibriSpeech test-clean utterance is mixed with a randomly selected noise or background sound
at -5, 0, 5, 10, 25, 50 and 100 dB SNR. Selection here is *seeded per sample id*: the noise clip and its start
offset depend only on ``(seed, sample id)``, so a resumed or re-ordered run mixes exactly the same audio, and all
SNR levels of one utterance share the same noise (the WER-per-SNR curve then varies the level only).

Why not Lhotse's ``MixedCut``: it pads a shorter noise with silence instead of looping it, and computes the gain
from whole-track energies, so the SNR over the speech is not what was asked for. :func:`mix_at_snr` loops the
noise to cover the utterance and scales it on exactly the mixed span, which makes the achieved SNR exact (the
tests hold it to 0.1 dB at every level).

Example::

    bank = NoiseBank.from_folder("musan/noise")                  # or NoiseBank.synthetic("white")
    noisy, info = bank.mix(clean_wav, sample_id="1089-134686-0000", snr_db=5, seed=0)
    info["noise_id"], info["achieved_snr_db"]                    # ('noise-free-sound-0042', 5.0)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from lhotse import load_manifest

from audex.audio import load_audio, to_model_audio

SNR_LEVELS_DB: tuple[float, ...] = (-5, 0, 5, 10, 25, 50, 100)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")


def signal_power(x: torch.Tensor | np.ndarray) -> float:
    """Mean square of a waveform (float64 accumulation)."""
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    return float(np.mean(x * x))


def loop_to_length(noise: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """``length`` samples of ``noise`` starting at ``offset``, wrapping around as often as needed."""
    if noise.numel() == 0:
        raise ValueError("cannot mix with an empty noise clip")
    idx = (torch.arange(length) + int(offset)) % noise.numel()
    return noise.reshape(-1)[idx]


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix ``noise`` (looped from ``offset``) into ``clean`` so that 10 log10(P_clean / P_noise) = ``snr_db``.

    Returns ``(mixture, scaled_noise)``, both float32 ``[T]`` with ``mixture = clean + scaled_noise``; the gain is
    computed in float64 on the span that is mixed.
    """
    clean = torch.as_tensor(clean, dtype=torch.float32).reshape(-1)
    segment = loop_to_length(torch.as_tensor(noise, dtype=torch.float32).reshape(-1), clean.numel(), offset)
    p_clean, p_noise = signal_power(clean), signal_power(segment)
    if p_clean == 0.0:
        raise ValueError("the clean utterance is silent (zero power): an SNR is undefined")
    if p_noise == 0.0:
        raise ValueError("the noise segment is silent (zero power): choose another noise clip")
    gain = np.sqrt(p_clean / (p_noise * 10.0 ** (float(snr_db) / 10.0)))
    scaled = (segment.double() * gain).float()
    return clean + scaled, scaled


def achieved_snr_db(clean: torch.Tensor, scaled_noise: torch.Tensor) -> float:
    """SNR in dB of a clean signal and the noise that was added to it."""
    return 10.0 * float(np.log10(signal_power(clean) / signal_power(scaled_noise)))


@dataclass
class NoiseClip:
    noise_id: str
    load: Callable[[], torch.Tensor]  # -> 16 kHz mono float32 [T]


class NoiseBank:
    """A fixed, ordered set of noise clips with seeded per-sample selection.

    Build it from a folder of audio files, a Lhotse manifest (recordings or cuts), or synthetic noise (white /
    pink, generated with numpy from a seed; for smoke tests and demos, not for reporting benchmark numbers).
    Loaded clips are cached in memory.
    """

    def __init__(self, clips: Sequence[NoiseClip], description: str):
        if not clips:
            raise ValueError(f"the noise bank {description!r} holds no clips: point noise.folder/noise.manifest at noise audio")
        self.clips = list(clips)
        self.description = description
        self._cache: dict[str, torch.Tensor] = {}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> "NoiseBank":
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"noise folder {str(root)!r} does not exist")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        clips = [NoiseClip(str(p.relative_to(root)), (lambda p=p: load_audio(p))) for p in files]
        return cls(clips, f"folder {root}")

    @classmethod
    def from_manifest(cls, path: str | Path) -> "NoiseBank":
        """A Lhotse ``RecordingSet`` or ``CutSet`` manifest (JSONL, optionally gzipped)."""
        manifest = load_manifest(str(path))
        clips = []
        for item in manifest:
            sr = int(item.sampling_rate)
            clips.append(NoiseClip(item.id, (lambda item=item, sr=sr: to_model_audio(item.load_audio(), sr, item.id))))
        return cls(clips, f"manifest {path}")

    @classmethod
    def synthetic(cls, kind: str = "white", num_clips: int = 4, seconds: float = 5.0, seed: int = 0,
                  sample_rate: int = 16000) -> "NoiseBank":
        """Seeded Gaussian white noise, or pink noise (1/f power, shaped in the frequency domain)."""
        if kind not in ("white", "pink"):
            raise ValueError(f"synthetic noise kind must be 'white' or 'pink', got {kind!r}")
        n = int(seconds * sample_rate)

        def make(i: int) -> torch.Tensor:
            rng = np.random.default_rng([seed, i])
            x = rng.standard_normal(n)
            if kind == "pink":
                spec = np.fft.rfft(x)
                freqs = np.fft.rfftfreq(n)
                spec[1:] /= np.sqrt(freqs[1:])
                x = np.fft.irfft(spec, n)
            x = 0.1 * x / np.sqrt(np.mean(x * x))
            return torch.from_numpy(x.astype(np.float32))

        return cls([NoiseClip(f"{kind}-{i}", (lambda i=i: make(i))) for i in range(num_clips)], f"synthetic {kind} noise")

    # ---- selection and mixing ----------------------------------------------------------------
    def _audio(self, clip: NoiseClip) -> torch.Tensor:
        if clip.noise_id not in self._cache:
            self._cache[clip.noise_id] = clip.load()
        return self._cache[clip.noise_id]

    def pick(self, sample_id: str, seed: int = 0) -> tuple[NoiseClip, int]:
        """The clip and start offset for ``sample_id``: a function of ``(seed, sample_id)`` only."""
        digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=16).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        clip = self.clips[int(rng.integers(len(self.clips)))]
        offset = int(rng.integers(self._audio(clip).numel()))
        return clip, offset

    def mix(self, clean: torch.Tensor, sample_id: str, snr_db: float, seed: int = 0) -> tuple[torch.Tensor, dict]:
        clip, offset = self.pick(sample_id, seed)
        mixture, scaled = mix_at_snr(clean, self._audio(clip), snr_db, offset)
        return mixture, {"noise_id": clip.noise_id, "noise_offset": offset, "snr_db": float(snr_db),
                         "achieved_snr_db": round(achieved_snr_db(clean, scaled), 4)}
