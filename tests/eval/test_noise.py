"""Noise mixing hits the requested SNR within 0.1 dB; selection is seeded per sample id."""

import math

import numpy as np
import pytest
import torch

from audex.eval.noise import SNR_LEVELS_DB, NoiseBank, achieved_snr_db, loop_to_length, mix_at_snr


def speech_like(seconds=2.0, sr=16000, seed=0):
    """A tone with a syllable-rate envelope and some harmonics (non-stationary, like speech)."""
    t = torch.arange(int(seconds * sr)) / sr
    envelope = 0.5 * (1 + torch.sin(2 * math.pi * 4 * t))
    gen = torch.Generator().manual_seed(seed)
    return envelope * (0.3 * torch.sin(2 * math.pi * 180 * t) + 0.1 * torch.sin(2 * math.pi * 540 * t)
                       + 0.01 * torch.randn(t.shape, generator=gen))


def test_paper_levels():
    assert SNR_LEVELS_DB == (-5, 0, 5, 10, 25, 50, 100)


@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize("snr", SNR_LEVELS_DB)
def test_mixture_hits_requested_snr(kind, snr):
    clean = speech_like()
    bank = NoiseBank.synthetic(kind, num_clips=3, seconds=0.7)  # shorter than the speech: the noise is looped
    noisy, info = bank.mix(clean, "utt-1", snr, seed=0)
    assert noisy.shape == clean.shape and noisy.dtype == torch.float32
    # measured from what was actually added to the float32 clean signal
    assert abs(achieved_snr_db(clean, noisy - clean) - snr) < 0.1
    assert abs(info["achieved_snr_db"] - snr) < 0.1


def test_mix_at_snr_by_hand():
    clean = torch.full((1000,), 0.5)        # power 0.25
    noise = torch.tensor([1.0, -1.0] * 50)  # power 1, looped over 1000 samples
    mixture, scaled = mix_at_snr(clean, noise, snr_db=10.0, offset=1)
    # gain^2 = 0.25 / (1 * 10) -> gain = 0.158113...
    assert float(scaled.abs().max()) == pytest.approx(math.sqrt(0.025), rel=1e-6)
    assert float(scaled[0]) < 0  # offset 1 starts on the second noise sample
    assert torch.allclose(mixture, clean + scaled)
    assert loop_to_length(torch.tensor([1.0, 2.0, 3.0]), 7, offset=2).tolist() == [3, 1, 2, 3, 1, 2, 3]


def test_selection_is_seeded_per_sample_and_independent_of_order():
    bank = NoiseBank.synthetic("white", num_clips=8)
    picks = {sid: bank.pick(sid, seed=0) for sid in ["a", "b", "c", "d", "e", "f"]}
    again = NoiseBank.synthetic("white", num_clips=8)
    for sid in reversed(list(picks)):
        clip, offset = again.pick(sid, seed=0)
        assert (clip.noise_id, offset) == (picks[sid][0].noise_id, picks[sid][1])
    assert len({(c.noise_id, o) for c, o in picks.values()}) == len(picks)
    other_seed = [bank.pick(sid, seed=1) for sid in picks]
    assert [(c.noise_id, o) for c, o in other_seed] != [(c.noise_id, o) for c, o in picks.values()]
    # the same noise at every level of one utterance
    clean = speech_like(1.0)
    _, low = bank.mix(clean, "a", -5)
    _, high = bank.mix(clean, "a", 50)
    assert (low["noise_id"], low["noise_offset"]) == (high["noise_id"], high["noise_offset"])


def test_bank_from_folder_and_bad_input(tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(0)
    sf.write(tmp_path / "n1.wav", 0.1 * rng.standard_normal(8000), 8000)  # resampled to 16 kHz on load
    sf.write(tmp_path / "n2.flac", 0.1 * rng.standard_normal(16000), 16000)
    bank = NoiseBank.from_folder(tmp_path)
    assert [c.noise_id for c in bank.clips] == ["n1.wav", "n2.flac"]
    noisy, info = bank.mix(speech_like(1.0), "x", 5.0)
    assert abs(info["achieved_snr_db"] - 5.0) < 0.1
    with pytest.raises(ValueError, match="silent"):
        mix_at_snr(speech_like(0.5), torch.zeros(100), 0.0)
    with pytest.raises(ValueError, match="silent"):
        mix_at_snr(torch.zeros(100), torch.ones(100), 0.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no clips"):
        NoiseBank.from_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NoiseBank.from_folder(tmp_path / "nowhere")
