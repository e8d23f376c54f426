"""Data loaders: blending in epochs (Table 3), bucketing, online packing, skips, NeMo's loader, the YAML configs."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording
from omegaconf import OmegaConf

from audex.data import schema
from audex.data.blend import blend_from_epochs
from audex.data.loader import build_dataloader, plan_blend
from audex.data.options import split_config
from audex.data.skips import INVALID_BASE64, MISSING_AUDIO, TOO_LONG_FOR_CONTEXT, UNKNOWN_TASK, TooManySkipsError
from audex.modules.audio_encoder import WindowedFrames
from audex.tokenizer import AudexTokenizer

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("text", "asr", "audio_qa", "tts", "tta")
TINY_FRAMES = WindowedFrames(window_samples=10 * 16000, frames_per_window=250)  # conf/model/tiny.yaml: 10 s windows

# Table 2 (samples, tokens) and Table 3 (epochs per data type, "Text weights (%)")
TABLE2_SAMPLES = {"text": 33e6, "asr": 95e6, "ast": 58e6, "understanding": 49e6, "tts": 147e6, "tta": 12e6}
TABLE2_TOKENS = {"text": 303.0e9, "asr": 22.5e9, "ast": 16.8e9, "understanding": 29.9e9, "tts": 81.0e9, "tta": 24.7e9}
TABLE3 = {  # stage: ({data type: epochs}, text share in %)
    "audio_warmup": ({"text": 0.5, "asr": 0, "ast": 0, "understanding": 2, "tts": 1, "tta": 2}, 44),
    "audio_gen": ({"text": 0.5, "asr": 0, "ast": 0, "understanding": 0, "tts": 1, "tta": 1}, 59),
    "gen_und": ({"text": 1.5, "asr": 1, "ast": 1, "understanding": 2, "tts": 1, "tta": 1}, 69),
    "consolidated": ({"text": 2.0, "asr": 1, "ast": 1, "understanding": 2, "tts": 1, "tta": 1}, 75),
}


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny()


def _wav(path: Path, seconds: float, rng) -> Recording:
    sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return Recording.from_file(path)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> Path:
    """{task}_{split}.jsonl.gz as scripts/make_demo_data.py names them, with one bad cut in three of them."""
    root = tmp_path_factory.mktemp("manifests")
    (root / "audio").mkdir()
    rng = np.random.default_rng(0)
    chat = lambda i: [{"role": "user", "content": "What is " + "two plus " * (i % 7 + 1) + "?"},  # noqa: E731
                      {"role": "assistant", "content": "It is " + "more " * (i % 11 + 1)}]
    for split, n in (("train", 24), ("val", 4)):
        cuts = {
            "text": [schema.make_text_cut(f"text-{split}-{i}", chat(i)) for i in range(n)],
            "asr": [schema.make_asr_cut(_wav(root / "audio" / f"asr-{split}-{i}.wav", 0.5 + 0.1 * i, rng),
                                        "hello world " * (i % 3 + 1), "en", cut_id=f"asr-{split}-{i}") for i in range(n // 2)],
            "audio_qa": [schema.make_audio_qa_cut(_wav(root / "audio" / f"qa-{split}-{i}.wav", 1.0, rng),
                                                  "What is it?", "A hiss.", cut_id=f"audio_qa-{split}-{i}")
                         for i in range(n // 4)],
            "tts": [schema.make_tts_cut("say it " * (i % 4 + 1), speech_codes=rng.integers(0, 256, 40 + 10 * i),
                                        cut_id=f"tts-{split}-{i}") for i in range(n // 2)],
            "tta": [schema.make_tta_cut("a dog barks", audio_codes=rng.integers(0, 64, (4, 500)), cut_id=f"tta-{split}-{i}")
                    for i in range(n // 4)],
        }
        if split == "train":  # bad input: a missing file, invalid base64, an unknown task
            cuts["asr"][0].recording.sources[0].source = str(root / "audio" / "gone.wav")
            cuts["tts"][0].custom["speech_codes"] = "not base64!"
            cuts["text"][0].custom["task"] = "karaoke"
        for task, items in cuts.items():
            CutSet.from_cuts(items).to_file(root / f"{task}_{split}.jsonl.gz")
    return root


def demo_config(manifests: Path, **overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "data" / "demo.yaml")
    cfg.manifest_dir = str(manifests)
    cfg.train_ds.batch_size = 8
    cfg.packing.buffer_size = 32
    cfg.max_skip_rate = 0.5
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


# ---- blending in epochs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", list(TABLE3))
def test_blend_from_epochs_reproduces_table3_text_share(stage):
    epochs, text_percent = TABLE3[stage]
    plan = blend_from_epochs(epochs, TABLE2_SAMPLES, TABLE2_TOKENS)
    assert round(100 * plan.token_shares()["text"]) == text_percent
    # sampling weights are epochs x examples, normalised; 0-epoch types are not drawn
    drawn = {k: e * TABLE2_SAMPLES[k] for k, e in epochs.items() if e}
    assert plan.weights == pytest.approx({k: v / sum(drawn.values()) for k, v in drawn.items()})
    assert plan.total_samples == round(sum(drawn.values()))
    assert plan.optimizer_steps(64) == -(-plan.total_samples // 64)  # padded: 64 samples per step
    rows = plan.total_tokens / (262144 * 0.99)
    assert plan.optimizer_steps(64, max_length=262144) == int(np.ceil(rows / 64))


def test_blend_from_epochs_rejects_bad_input():
    with pytest.raises(KeyError, match="'tts' has epochs but no size"):
        blend_from_epochs({"tts": 1.0}, {"text": 10})
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        blend_from_epochs({"tts": -1.0}, {"tts": 10})
    with pytest.raises(ValueError, match="nothing to train on"):
        blend_from_epochs({"tts": 0.0}, {"tts": 10})


@pytest.fixture(scope="module")
def blend_manifests(tmp_path_factory) -> tuple[Path, dict]:
    """Four sources whose cuts carry their token count (so that sampling needs no tokenisation)."""
    root = tmp_path_factory.mktemp("blend")
    sizes = {"text": 40000, "audio_qa": 10000, "tts": 20000, "tta": 10000}
    for name, n in sizes.items():
        CutSet.from_cuts(MonoCut(id=f"{name}-{i}", start=0.0, duration=0.0, channel=0, recording=None,
                                 custom={"task": "text", "num_tokens": 20 + (i * 37) % 2000}) for i in range(n)
                         ).to_file(root / f"{name}.jsonl.gz")
    return root, sizes


@pytest.mark.slow
def test_bucketed_blend_ratios_match_configured_epochs(blend_manifests, tok):
    """Table 3's audio-warmup epochs, measured over every bucketed batch of a training pass: within 2 %."""
    root, sizes = blend_manifests
    epochs = {"text": 0.5, "audio_qa": 2.0, "tts": 1.0, "tta": 2.0}
    cfg = OmegaConf.create({
        "manifest_dir": str(root), "max_length": 4096, "blend_epochs": epochs, "packing": {"enabled": False},
        "filters": {"text_max_tokens": None},
        "train_ds": {"input_cfg": [{"type": "lhotse", "cuts_path": f"{k}.jsonl.gz", "blend": k} for k in sizes],
                     "use_multimodal_sampling": True, "batch_tokens": 16384, "shuffle": True, "seed": 0,
                     "use_bucketing": True, "num_buckets": 8, "concurrent_bucketing": False}})
    loader = build_dataloader(cfg, tok, None, "train")
    assert loader.plan.total_samples == sum(epochs[k] * n for k, n in sizes.items()) == 80000
    drawn: Counter = Counter()
    real = positions = 0
    for cuts in loader.sampler:  # the batches as sampled (no sequence building needed to count them)
        lengths = [c.num_tokens for c in cuts]
        # batch_tokens counts padded tokens; Lhotse closes a batch once it is reached (the last cut may overshoot)
        assert (len(lengths) - 1) * max(lengths[:-1], default=0) <= 16384
        real, positions = real + sum(lengths), positions + len(lengths) * max(lengths)
        drawn.update(c.id.split("-")[0] for c in cuts)
    assert sum(drawn.values()) == 80000
    for name, n in sizes.items():
        assert drawn[name] / n == pytest.approx(epochs[name], rel=0.02), name
    # 8 buckets over lengths spread evenly in 20..2,020 tokens: each batch pads to at most ~1/8 of the range more
    assert real / positions > 0.8


# ---- the end-to-end loader ---------------------------------------------------------------------------------
def test_train_loader_packs_online_and_counts_skips(manifests, tok):
    cfg = demo_config(manifests)
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "train")
    plan = loader.plan
    assert {s.blend: s.num_samples for s in plan.sources} == {"text": 24, "asr_ast": 12, "understanding": 6, "tts": 12,
                                                                 "tta": 6}
    batches = list(loader)
    assert batches and all(b.num_rows == 1 and b.input_ids.shape[1] <= cfg.max_length for b in batches)
    kept = sum(b.num_samples for b in batches)
    assert loader.skips.kept == kept and loader.skips.seen == plan.total_samples == 60
    assert set(loader.skips.counts) <= {MISSING_AUDIO, INVALID_BASE64, UNKNOWN_TASK}
    assert loader.skips.skipped == 60 - kept
    for b in batches:  # packed rows: positions restart at every sample, each sample's audio is in the batch
        for j in range(int(b.sample_ids.max()) + 1):
            pos = b.position_ids[0][b.sample_ids[0] == j]
            assert pos.tolist() == list(range(pos.numel()))
        assert len(b.audios) == sum(t in schema.AUDIO_INPUT_TASKS for t in b.tasks)
    assert sum(b.num_real_tokens for b in batches) / sum(b.input_ids.numel() for b in batches) > 0.9


def test_train_loader_is_seeded_by_epoch_not_by_workers(manifests, tok):
    def order(epoch, workers=0):
        cfg = demo_config(manifests)
        cfg.train_ds.num_workers = workers
        return [c for b in build_dataloader(cfg, tok, TINY_FRAMES, "train", epoch=epoch) for c in b.cut_ids]

    assert order(0) == order(0) == order(0, workers=2)  # workers build, the training process packs
    assert order(0) != order(1)


def test_too_many_skips_stop_with_a_clear_error(manifests, tok):
    cfg = demo_config(manifests, max_skip_rate=0.001, min_examples_for_skip_rate=10)
    with pytest.raises(TooManySkipsError, match="above max_skip_rate=0.001"):
        list(build_dataloader(cfg, tok, TINY_FRAMES, "train"))


def test_too_long_examples_are_skipped_not_packed(manifests, tok):
    cfg = demo_config(manifests, max_length=1024, max_skip_rate=None,
                      blend_epochs={"text": 0, "asr_ast": 0, "understanding": 0, "tts": 0, "tta": 1})
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "train")
    assert list(loader) == []  # every TTA example is ~2,040 tokens
    assert loader.skips.counts == {TOO_LONG_FOR_CONTEXT: 6}


def test_val_loader_reads_every_cut_once(manifests, tok):
    cfg = demo_config(manifests)
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "val")
    ids = [c for b in loader for c in b.cut_ids]
    expected = [c.id for t in TASKS for c in CutSet.from_file(manifests / f"{t}_val.jsonl.gz")]
    assert sorted(ids) == sorted(expected) and loader.plan is None and loader.skips.skipped == 0


@pytest.mark.parametrize("use_bucketing", [False, True])
def test_padded_loader_one_sample_per_row(manifests, tok, use_bucketing):
    cfg = demo_config(manifests, packing={"enabled": False}, blend_epochs={"text": 1, "tts": 1, "asr_ast": 0,
                                                                             "understanding": 0, "tta": 0})
    cfg.train_ds.update(use_bucketing=use_bucketing, batch_tokens=4096, num_buckets=2, concurrent_bucketing=False)
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "train")
    batches = list(loader)
    assert sum(b.num_samples for b in batches) + loader.skips.skipped == 36  # 24 text + 12 TTS draws
    assert set(loader.skips.counts) <= {UNKNOWN_TASK, INVALID_BASE64}
    for b in batches:
        lengths = b.sample_ids.ge(0).sum(dim=1)
        assert b.samples_per_row == [1] * b.num_rows and b.input_ids.shape[1] == -(-int(lengths.max()) // 8) * 8


def test_nemo_dataloader_for_audio_only_blends(manifests, tok):
    """use_multimodal_sampling: false hands sampling to NeMo's get_lhotse_dataloader_from_config."""
    cfg = demo_config(manifests, packing={"enabled": False})
    cfg.train_ds.input_cfg = [{"type": "lhotse", "cuts_path": "audio_qa_train.jsonl.gz", "blend": "understanding"}]
    cfg.train_ds.update(use_multimodal_sampling=False, batch_duration=3.0, batch_size=None)
    batches = list(build_dataloader(cfg, tok, TINY_FRAMES, "train"))  # NeMo reads a single source once
    assert sum(b.num_samples for b in batches) == 6
    for batch in batches:
        assert batch.tasks == ["audio_qa"] * batch.num_samples and len(batch.audios) == batch.num_samples
        assert 1 <= batch.num_samples <= 3  # 1 s clips, 3 s of audio per batch
    cfg.train_ds.input_cfg.append({"type": "lhotse", "cuts_path": "text_train.jsonl.gz", "blend": "text"})
    with pytest.raises(ValueError, match="set use_multimodal_sampling: true"):
        build_dataloader(cfg, tok, TINY_FRAMES, "train")


def test_config_errors_name_the_problem(manifests, tok):
    cfg = demo_config(manifests)
    cfg.train_ds.input_cfg[0].blend = "speech"
    with pytest.raises(KeyError, match="blend 'speech', which blend_epochs does not list"):
        build_dataloader(cfg, tok, TINY_FRAMES, "train")
    with pytest.raises(KeyError, match="no 'test_ds' section"):
        split_config(demo_config(manifests), "test")
    cfg = demo_config(manifests)
    cfg.train_ds.update(batch_size=None)
    with pytest.raises(ValueError, match="set batch_tokens"):
        build_dataloader(cfg, tok, TINY_FRAMES, "train")


def test_stage_blends_and_plan(manifests, tok):
    """conf/stage1.yaml's blend_epochs drive the demo blend; plan_blend measures tokens per source."""
    stage1 = OmegaConf.load(ROOT / "conf" / "stage1.yaml")
    cfg = demo_config(manifests, blend_epochs=stage1.data.blend_epochs)
    plan = plan_blend(cfg, tok, TINY_FRAMES)
    assert {s.blend: s.epochs for s in plan.sources} == {"text": 0.5, "understanding": 2.0, "tts": 1.0, "tta": 2.0}
    assert plan.total_samples == 0.5 * 24 + 2 * 6 + 12 + 2 * 6
    tta = next(s for s in plan.sources if s.blend == "tta")
    assert 2000 < tta.mean_tokens < 2200  # 2,000 codec tokens + the TTA prompt
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "train")  # what the training run attaches to the model
    assert loader.plan.total_samples == plan.total_samples
    assert next(iter(loader)).num_samples > 0


def test_default_config_is_the_papers():
    """conf/data/default.yaml: the paper's context and packing buffer, Table 3's data types, NeMo's key schema."""
    from nemo.collections.common.data.lhotse.dataloader import LhotseDataLoadingConfig

    cfg = OmegaConf.load(ROOT / "conf" / "data" / "default.yaml")
    for split in ("train", "val"):
        options, nemo = split_config(cfg, split)
        assert options.max_length == 262144 and options.packing.buffer_size == 8192
        assert set(nemo) <= set(LhotseDataLoadingConfig.__dataclass_fields__)  # no key NeMo would ignore
    stage_types = set(OmegaConf.load(ROOT / "conf" / "stage3.yaml").data.blend_epochs)
    for name in ("default.yaml", "demo.yaml"):
        data = OmegaConf.load(ROOT / "conf" / "data" / name)
        assert set(data.blend_epochs) == stage_types  # a stage's blend_epochs replaces every key
        assert {item.blend for item in data.train_ds.input_cfg} <= stage_types
