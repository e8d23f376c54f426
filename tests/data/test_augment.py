"""Noisy and reverberant copies of clean ASR speech: exact SNRs, unchanged transcripts, seeded, serialisable."""

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Recording, RecordingSet
from lhotse.cut import MixedCut

from audex.data import schema
from audex.data.augment import AugmentConfig, augment_cutset

SR = 16000


def snr_db(clean: np.ndarray, mixture: np.ndarray) -> float:
    noise = mixture - clean
    return float(10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Clean ASR speech of 1.3-12 s, a text chat, non-stationary noise shorter and longer than the speech, an RIR."""
    d = tmp_path_factory.mktemp("augment")
    rng = np.random.default_rng(0)
    cuts = []
    for i, seconds in enumerate([1.3, 2.0, 3.7, 12.0]):
        t = np.arange(int(SR * seconds)) / SR
        sf.write(d / f"s{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) * (1 + 0.5 * np.sin(7 * t))).astype(np.float32), SR)
        cuts.append(schema.make_asr_cut(Recording.from_file(d / f"s{i}.wav"), f"HELLO NUMBER {i}", "en", cut_id=f"c{i}"))
    cuts.append(schema.make_text_cut("chat0", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    CutSet.from_cuts(cuts).to_file(d / "asr.jsonl.gz")
    noise = []
    for j, seconds in enumerate([0.6, 25.0]):
        n = int(SR * seconds)
        sf.write(d / f"n{j}.wav", (rng.standard_normal(n) * np.linspace(0.05, 0.3, n)).astype(np.float32), SR)
        noise.append(Recording.from_file(d / f"n{j}.wav").to_cut())
    rir = np.exp(-np.arange(3000) / 600.0) * rng.standard_normal(3000)
    rir[0] = 1.0
    sf.write(d / "rir.wav", rir.astype(np.float32), SR)
    return d, CutSet.from_cuts(noise), RecordingSet.from_recordings([Recording.from_file(d / "rir.wav")])


def test_noisy_and_reverberant_copies(corpus):
    d, noise, rirs = corpus
    clean = {c.id: c for c in CutSet.from_file(d / "asr.jsonl.gz")}
    cfg = AugmentConfig(noisy_snrs_db=((0.0, 20.0), -5.0, 10.0), reverb_copies=1, reverb_noisy_snrs_db=(5.0,))
    augment_cutset(CutSet.from_file(d / "asr.jsonl.gz"), noise, rirs, cfg).to_file(d / "aug.jsonl.gz")
    out = list(CutSet.from_file(d / "aug.jsonl.gz"))  # the copies survive a manifest round trip
    ids = [c.id for c in out]
    asr_ids = [f"c{i}" for i in range(4)]
    assert ids[:5] == asr_ids + ["chat0"]  # the originals first, unchanged; the chat gets no copies
    expected_copies = {f"{c}{s}" for c in asr_ids for s in ("_noise0", "_noise1", "_noise2", "_rvb0", "_rvbnoise0")}
    assert set(ids[5:]) == expected_copies and len(ids) == 5 + len(expected_copies)
    drawn = []
    for cut in out[5:]:
        base = clean[cut.id.split("_")[0]]
        # transcript, language and task are the clean cut's
        assert cut.supervisions[0].text == base.supervisions[0].text and cut.supervisions[0].language == "en"
        assert schema.get_task(cut) == "asr" and schema.get_transcript(cut) == schema.get_transcript(base)
        assert cut.duration == pytest.approx(base.duration)
        if cut.id.endswith("_rvb0"):
            audio = cut.load_audio()[0]
            assert audio.shape == base.load_audio()[0].shape and not np.allclose(audio, base.load_audio()[0])
            continue
        assert isinstance(cut, MixedCut)
        snrs = {t.snr for t in cut.tracks[1:]}
        assert len(snrs) == 1  # every noise piece at the copy's SNR
        target = snrs.pop()
        reference = cut.tracks[0].cut.load_audio()[0]  # the clean (or reverberant) speech
        mixture = cut.load_audio()[0]
        assert mixture.shape == reference.shape
        assert snr_db(reference, mixture) == pytest.approx(target, abs=0.1), cut.id
        kind = cut.id.split("_")[1]
        if kind == "noise0":
            assert 0.0 <= target <= 20.0
            drawn.append(target)
        else:
            assert target == {"noise1": -5.0, "noise2": 10.0, "rvbnoise0": 5.0}[kind]
    assert len(set(drawn)) == 4  # a range draws a different SNR per copy
    # the 12 s utterance needs several noise pieces laid back to back
    assert len(next(c for c in out if c.id == "c3_noise1").tracks) >= 3


def test_copies_are_seeded(corpus):
    d, noise, rirs = corpus

    def recipe(seed):
        cfg = AugmentConfig(noisy_snrs_db=((0.0, 20.0),), reverb_copies=0, seed=seed)
        return [(c.id, [(t.cut.id, t.offset, t.snr) for t in c.tracks[1:]])
                for c in augment_cutset(CutSet.from_file(d / "asr.jsonl.gz"), noise, rirs, cfg) if isinstance(c, MixedCut)]

    assert recipe(0) == recipe(0)
    assert recipe(0) != recipe(1)


def test_augment_needs_its_manifests(corpus):
    d, noise, rirs = corpus
    cuts = CutSet.from_file(d / "asr.jsonl.gz")
    with pytest.raises(ValueError, match="no noise manifest"):
        augment_cutset(cuts, None, rirs, AugmentConfig())
    with pytest.raises(ValueError, match="no room impulse responses"):
        augment_cutset(cuts, noise, None, AugmentConfig())
    with pytest.raises(ValueError, match="tasks with input audio"):
        AugmentConfig(tasks=("tts",))
    with pytest.raises(ValueError, match=r"\(low, high\)"):
        AugmentConfig(noisy_snrs_db=((20.0, 0.0),))


def test_noisy_copy_builds_a_sequence(corpus):
    from audex.data.sequence import SequenceBuilder
    from audex.tokenizer import AudexTokenizer

    d, noise, _ = corpus
    copies = augment_cutset(CutSet.from_file(d / "asr.jsonl.gz"), noise, None, AugmentConfig(reverb_copies=0))
    noisy = next(c for c in copies if c.id == "c1_noise0")
    seq = SequenceBuilder(AudexTokenizer.build_tiny(), max_length=4096)(noisy)
    assert seq.task == "asr" and seq.audios[0].shape == (2 * SR,)
