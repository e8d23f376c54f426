"""Noisy and reverberant copies of clean ASR speech (section 4.1), made with Lhotse's own mixing and reverb.

The paper augments its ASR data with noisy and reverberant versions of the clean speech (real noise and room
impulse responses of the 5th DNS Challenge) and keeps the original transcript as the target.
:func:`augment_cutset` returns the input cuts followed by, for every clean cut of ``config.tasks``:

* one **noisy copy** per entry of ``noisy_snrs_db`` -- Lhotse's ``CutSet.mix``: noise clips, drawn at random
  and laid back to back until they cover the utterance, are scaled against the speech's energy to the SNR,
  a fixed value or drawn uniformly from a ``(low, high)`` range; the chosen SNR is stored in the copy's noise
  tracks (``copy.tracks[1].snr``), and the SNR over the utterance is exact (the tests hold it to 0.1 dB).
  Long noise recordings are first cut into ``noise_window_seconds`` windows (``CutSet.cut_into_windows``),
  so that every part of them gets used while each mix starts at a window boundary: Lhotse's own
  ``random_mix_offset`` truncates the noise 50 ms short of the utterance, which biases the SNR of a 2 s
  clip by +0.11 dB;
* ``reverb_copies`` **reverberant copies** -- ``cut.reverb_rir(rir)`` with a real RIR recording, one drawn per
  cut (seeded by the cut id). Lhotse's ``CutSet.reverb_rir`` is not used because it draws a single RIR for the
  whole set (one unseeded ``random.choice``), and its synthetic RIRs need torchaudio, which Audex does not
  install;
* one **reverberant + noisy copy** per entry of ``reverb_noisy_snrs_db`` (reverb first, then noise at the SNR
  of the reverberant speech).

Copies keep the transcript, language and ``custom`` of their cut; their ids get ``_noise{k}``, ``_rvb{k}``,
``_rvbnoise{k}``. Everything is lazy and nothing is written to disk: the manifest stores the recipe (a
``MixedCut`` with the noise and its SNR, a recording transform with the RIR) and the audio is made on load.
The same manifests and seed give the same copies.

Example::

    >>> noise = CutSet.from_file("dns_noise.jsonl.gz")
    >>> rirs = RecordingSet.from_file("dns_rirs.jsonl.gz")
    >>> cfg = AugmentConfig(noisy_snrs_db=((0, 20),), reverb_copies=1)
    >>> augment_cutset(CutSet.from_file("asr_train.jsonl.gz"), noise, rirs, cfg).to_file("asr_train_aug.jsonl.gz")
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Sequence

from lhotse import CutSet, Recording
from lhotse.cut import Cut

from audex.data import schema

NOISE_SUFFIX = "_noise"
REVERB_SUFFIX = "_rvb"
REVERB_NOISE_SUFFIX = "_rvbnoise"

Snr = float | tuple[float, float]


@dataclass(frozen=True)
class AugmentConfig:
    """Copies per clean cut: one noisy copy per SNR entry (a value, or a ``(low, high)`` range drawn uniformly),
    ``reverb_copies`` reverberant ones, one reverberant + noisy copy per ``reverb_noisy_snrs_db`` entry."""

    noisy_snrs_db: tuple[Snr, ...] = ((0.0, 20.0),)
    reverb_copies: int = 1
    reverb_noisy_snrs_db: tuple[Snr, ...] = ()
    tasks: tuple[str, ...] = (schema.ASR,)
    noise_window_seconds: float | None = 10.0
    seed: int = 0

    def __post_init__(self):
        if self.reverb_copies < 0:
            raise ValueError(f"reverb_copies must be >= 0, got {self.reverb_copies}")
        for snr in (*self.noisy_snrs_db, *self.reverb_noisy_snrs_db):
            if isinstance(snr, (tuple, list)) and (len(snr) != 2 or snr[0] > snr[1]):
                raise ValueError(f"an SNR range must be (low, high) with low <= high, got {snr}")
        unknown = set(self.tasks) - set(schema.AUDIO_INPUT_TASKS)
        if unknown:
            raise ValueError(f"augmentation applies to tasks with input audio {schema.AUDIO_INPUT_TASKS}, "
                             f"got {sorted(unknown)}")

    @property
    def needs_noise(self) -> bool:
        return bool(self.noisy_snrs_db or self.reverb_noisy_snrs_db)

    @property
    def needs_rirs(self) -> bool:
        return bool(self.reverb_copies or self.reverb_noisy_snrs_db)


def _affix(cut_id: str, suffix: str) -> str:
    return cut_id + suffix


def _has_task(cut: Cut, tasks: tuple[str, ...]) -> bool:
    return (cut.custom or {}).get("task") in tasks


class RandomRirReverb:
    """``cut -> cut.reverb_rir(rir)`` with an RIR drawn per cut, seeded by ``(seed, cut.id)`` (a picklable map)."""

    def __init__(self, rirs: Sequence[Recording], seed: int = 0):
        self.rirs = list(rirs)
        if not self.rirs:
            raise ValueError("RandomRirReverb needs at least one room impulse response")
        self.seed = seed

    def __call__(self, cut: Cut) -> Cut:
        rir = random.Random(f"{self.seed}/{cut.id}").choice(self.rirs)
        return cut.reverb_rir(rir, affix_id=False)


def noisy_copies(cuts: CutSet, noise: CutSet, snr_db: Snr, seed: int, suffix: str = f"{NOISE_SUFFIX}0") -> CutSet:
    """Lhotse's ``CutSet.mix``: every cut with noise over its whole duration at ``snr_db``; ids get ``suffix``."""
    snr = tuple(snr_db) if isinstance(snr_db, (tuple, list)) else float(snr_db)
    mixed = cuts.mix(noise, snr=snr, preserve_id="left", seed=seed)
    return mixed.modify_ids(partial(_affix, suffix=suffix))


def reverberant_copies(cuts: CutSet, rirs: Sequence[Recording], seed: int, suffix: str = f"{REVERB_SUFFIX}0") -> CutSet:
    """Every cut convolved with a room impulse response drawn for it; ids get ``suffix``."""
    out = cuts.map(RandomRirReverb(rirs, seed))
    return out.modify_ids(partial(_affix, suffix=suffix)) if suffix else out


def augment_cutset(cuts: CutSet, noise: CutSet | None = None, rirs: Sequence[Recording] | None = None,
                   config: AugmentConfig = AugmentConfig(), sampling_rate: int = schema.SAMPLE_RATE) -> CutSet:
    """``cuts`` followed by the noisy / reverberant copies of their clean ``config.tasks`` cuts (lazy).

    ``cuts`` is read once per kind of copy: pass a manifest-backed or eager ``CutSet``, not a one-shot iterator.
    Apply it to a clean manifest once (copies of copies are not wanted).
    """
    if config.needs_noise and noise is None:
        raise ValueError("noisy copies were requested but no noise manifest was given")
    if config.needs_rirs and not rirs:
        raise ValueError("reverberant copies were requested but no room impulse responses (RIR manifest) were given")
    clean = cuts.filter(partial(_has_task, tasks=tuple(config.tasks)))
    if noise is not None:
        noise = noise.resample(sampling_rate)
        if config.noise_window_seconds is not None:
            noise = noise.cut_into_windows(duration=config.noise_window_seconds)
    parts = [cuts]
    for k, snr in enumerate(config.noisy_snrs_db):
        parts.append(noisy_copies(clean, noise, snr, config.seed + k, f"{NOISE_SUFFIX}{k}"))
    for k in range(config.reverb_copies):
        parts.append(reverberant_copies(clean, rirs, config.seed + k, f"{REVERB_SUFFIX}{k}"))
    for k, snr in enumerate(config.reverb_noisy_snrs_db):
        reverberant = reverberant_copies(clean, rirs, config.seed + 1000 + k, suffix="")
        parts.append(noisy_copies(reverberant, noise, snr, config.seed + 1000 + k, f"{REVERB_NOISE_SUFFIX}{k}"))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    return out
