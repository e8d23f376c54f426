"""scripts/make_demo_data.py: real espeak-ng speech at 16 kHz, held-out sentences, codec codes, CFG copies."""

import importlib.util
import shutil
from pathlib import Path

import pytest
from lhotse import CutSet

from audex.data import schema

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                                reason="needs Debian's espeak-ng and sox (scripts/setup_env.sh installs them)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("demo")
    module.main(["--out", str(out), "--scale", "0.05", "--model-override", "audio_encoder.window_seconds=3.0"])
    return out, module


def _cuts(out, name):
    return list(CutSet.from_file(out / "manifests" / f"{name}.jsonl.gz"))


@pytest.mark.slow
def test_manifests_per_task_and_split(demo):
    out, module = demo
    for task in ("text", "asr", "tts", "tta", "audio_qa"):
        for split in ("train", "val", "test"):
            cuts = _cuts(out, f"{task}_{split}")
            assert cuts and all(schema.get_task(c) == task for c in cuts), (task, split)
    assert (out / "tiny_init.nemo").exists()


@pytest.mark.slow
def test_speech_is_16k_espeak_and_held_out_sentences_are_unseen(demo):
    out, module = demo
    train = _cuts(out, "asr_train")
    assert {c.custom["voice"] for c in train} == set(module.ASR_VOICES)
    for cut in train[:4]:
        assert cut.sampling_rate == 16000 and 1.0 < cut.duration < 4.0
        audio = cut.load_audio()
        assert audio.shape[0] == 1 and abs(audio).max() > 0.05  # mono, not silence
    seen = {schema.get_transcript(c) for c in train}
    for split in ("val", "test"):
        held_out = {schema.get_transcript(c) for c in _cuts(out, f"asr_{split}")}
        assert held_out and not held_out & seen
        words = {w for s in seen for w in s.split()}
        assert all(w in words for s in held_out for w in s.split())  # new combinations of known words


@pytest.mark.slow
def test_generation_targets_are_codec_codes_with_cfg_copies(demo):
    out, _ = demo
    tts = _cuts(out, "tts_train")
    originals = [c for c in tts if schema.get_cfg_uncond_pads(c) is None]
    copies = [c for c in tts if schema.get_cfg_uncond_pads(c) is not None]
    assert len(copies) == max(1, round(0.1 * len(originals)))  # 10 % (round half up), section 4.3
    codes = [tuple(schema.get_speech_codes(c, codebook_size=256).tolist()) for c in originals]
    assert len(set(codes)) == len(codes)  # every sentence has its own speech tokens
    assert all(1.0 * 50 < len(c) < 4.0 * 50 for c in codes)  # 1-4 s of espeak speech at 50 tokens/s
    for cut in _cuts(out, "tta_train"):
        codes = schema.get_audio_codes(cut, codebook_size=64)
        assert codes.shape == (4, 500)  # 10 s x 50 Hz, 4 RVQ layers
