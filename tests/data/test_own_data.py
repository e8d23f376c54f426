"""Bring your own data: NeMo manifests (plain, tarred), a Lhotse recipe's CutSet and a Hugging Face dataset, each
made here on generated audio, train two steps of a stage; the ASR suite evaluates the NeMo and HF data; bad rows
are counted skips with their reasons."""

import importlib.util
import io
import json
import math
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
from data_scripts import ROOT, load_script
from hydra import compose, initialize_config_dir
from lhotse import CutSet, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.recipes import prepare_librispeech
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from audex.data import schema
from audex.data.blend import annotate_input_cfg, count_samples
from audex.data.loader import build_dataloader, plan_blend
from audex.data.nemo_manifest import expand_paths, is_nemo_manifest, read_manifest_cuts
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder
from audex.data.skips import CORRUPT_AUDIO, MISSING_AUDIO, MISSING_FIELD, UNKNOWN_TASK
from audex.modules.audio_encoder import WindowedFrames
from audex.tokenizer import AudexTokenizer

WORDS = ["red", "blue", "cat", "dog", "two", "three", "boxes", "keys"]
HAS_TORCHCODEC = importlib.util.find_spec("torchcodec") is not None
TINY_FRAMES = WindowedFrames(window_samples=10 * 16000, frames_per_window=250)  # conf/model/tiny.yaml


def tone_bytes(seconds: float, freq: float, fmt: str = "WAV") -> bytes:
    t = np.arange(int(round(16000 * seconds))) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32), 16000, format=fmt)
    return buf.getvalue()


def sentence(i: int) -> str:
    return f"{WORDS[i % 8]} {WORDS[(i + 3) % 8]}"


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny()


@pytest.fixture(scope="module")
def nemo_dir(tmp_path_factory) -> Path:
    """manifest.json (audio_filepath/duration/text only, relative paths) and a 2-shard tarred copy."""
    root = tmp_path_factory.mktemp("nemo")
    (root / "wav").mkdir()
    lines = []
    for i in range(8):
        seconds = 0.5 + 0.05 * i
        (root / "wav" / f"u{i}.wav").write_bytes(tone_bytes(seconds, 300 + 40 * i))
        lines.append({"audio_filepath": f"wav/u{i}.wav", "duration": seconds, "text": sentence(i)})
    (root / "manifest.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for shard in range(2):
        with tarfile.open(root / f"audio_{shard}.tar", "w") as tar:
            for i in range(4 * shard, 4 * shard + 4):
                tar.add(root / "wav" / f"u{i}.wav", arcname=f"u{i}.wav")
        (root / f"tarred_{shard}.json").write_text("".join(
            json.dumps({"audio_filepath": f"u{i}.wav", "duration": lines[i]["duration"], "text": sentence(i),
                        "shard_id": shard}) + "\n" for i in range(4 * shard, 4 * shard + 4)))
    return root


class StepRecorder(Callback):
    def __init__(self):
        self.losses, self.global_step = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        self.global_step = trainer.global_step


def train_two_steps(input_cfg: list[dict], exp_dir: Path) -> tuple[StepRecorder, Path]:
    """Stage 3 of the tiny model, two optimizer steps (2 micro-batches each) on ``input_cfg`` alone."""
    from audex.training.run import train_stage

    overrides = [
        "model=tiny", "data=demo", "trainer=cpu", "~data.validation_ds", "data.max_length=1024",
        "data.global_batch_size=2", "data.max_skip_rate=0.5", "trainer.max_steps=2", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "model.text_gate.enabled=false", f"exp_manager.exp_dir={exp_dir}",
        "exp_manager.create_tensorboard_logger=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage3", overrides=overrides)
    cfg.data.manifest_dir = None
    cfg.data.blend_epochs = {"asr_ast": 3.0}
    cfg.data.train_ds.input_cfg = OmegaConf.create(input_cfg)
    rec = StepRecorder()
    nemo = train_stage(cfg, callbacks=[rec])
    assert rec.global_step == 2 and len(rec.losses) == 4
    assert all(math.isfinite(v) and v > 0 for v in rec.losses)
    return rec, nemo


def eval_asr(model: Path, manifest: Path, out: Path, **extra):
    from audex.eval.runner import run_eval

    with initialize_config_dir(config_dir=str(ROOT / "conf" / "eval"), version_base=None):
        cfg = compose(config_name="eval", overrides=[
            f"model={model}", "suite=asr", f"manifest={manifest}", f"output_dir={out}", "progress=false",
            "device=cpu", "+generation.asr.max_new_tokens=8"])
    for k, v in extra.items():
        cfg[k] = v
    return run_eval(cfg)


# ---- NeMo manifests --------------------------------------------------------------------------------
def test_nemo_items_count_without_num_samples_and_route_to_audex_reader(nemo_dir):
    item = {"type": "nemo", "manifest_filepath": "manifest.json", "tags": {"task": "asr"}, "blend": "asr_ast"}
    items, sources = annotate_input_cfg([item], {"asr_ast": 2.0}, manifest_dir=str(nemo_dir))
    assert items[0]["type"] == "audex_nemo" and items[0]["manifest_filepath"] == str(nemo_dir / "manifest.json")
    assert sources[0].num_samples == 8 and items[0]["weight"] == 16.0
    tarred = {"type": "nemo_tarred", "manifest_filepath": str(nemo_dir / "tarred__OP_0..1_CL_.json"),
              "tarred_audio_filepaths": str(nemo_dir / "audio__OP_0..1_CL_.tar")}
    assert count_samples(tarred) == 8
    assert is_nemo_manifest(tarred["manifest_filepath"]) and not is_nemo_manifest(nemo_dir / "wav" / "u0.wav")
    assert expand_paths(tarred["tarred_audio_filepaths"]) == [str(nemo_dir / "audio_0.tar"), str(nemo_dir / "audio_1.tar")]


def test_nemo_reader_does_not_import_the_asr_collection(nemo_dir, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from audex.data.nemo_manifest import read_manifest_cuts as r; "
            f"cuts = list(r({str(nemo_dir / 'manifest.json')!r})); "
            f"tar = list(r({str(nemo_dir / 'tarred__OP_0..1_CL_.json')!r}, {str(nemo_dir / 'audio__OP_0..1_CL_.tar')!r})); "
            "print(len(cuts), len(tar), cuts[3].load_audio().shape[1], tar[3].load_audio().shape[1], "
            "any(m.startswith('nemo.collections.asr') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split()[-5:] == ["8", "8", str(int(16000 * 0.65)), str(int(16000 * 0.65)), "False"]


def test_nemo_bad_rows_are_counted_skips(nemo_dir, tmp_path, tok):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + b"\x00" * 60)
    bad = [{"audio_filepath": str(nemo_dir / "wav" / "gone.wav"), "duration": 1.0, "text": "lost", "lang": "de"},
           {"audio_filepath": str(tmp_path / "corrupt.wav"), "duration": 1.0, "text": "broken", "lang": "de"},
           {"audio_filepath": str(nemo_dir / "wav" / "u1.wav"), "duration": 0.55, "text": "", "lang": "de"},
           {"audio_filepath": str(nemo_dir / "wav" / "u2.wav"), "duration": 0.6, "text": "sing", "lang": "de",
            "task": "karaoke"}]
    good = [json.loads(x) for x in (nemo_dir / "manifest.json").read_text().splitlines()]
    for x in good:
        x["audio_filepath"] = str(nemo_dir / x["audio_filepath"])
        x["lang"] = "de"  # per line; the item has no language tag
    good[0]["task"] = "asr"  # per line
    malformed = ['{"audio_filepath": "x.wav", "text": "no duration"}', '{"duration": 1.0, "text": "no file"}',
                 '{"audio_filepath": "y.wav", "dura']
    (tmp_path / "m.json").write_text("".join(json.dumps(x) + "\n" for x in good + bad) + "\n".join(malformed) + "\n")
    cfg = {"input_cfg": [{"type": "nemo", "manifest_filepath": str(tmp_path / "m.json"), "blend": "asr_ast"}],
           "blend_epochs": {"asr_ast": 1.0}, "batch_size": 4, "max_length": 1024, "max_skip_rate": None,
           "use_multimodal_sampling": True, "num_workers": 0, "shuffle": False, "packing": {"enabled": False}}
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "val")
    seen = [i for b in loader for i in b.cut_ids]
    # without a task tag only the line that has its own task is used; the tag of the item then overrides lines
    assert loader.skips.counts == {UNKNOWN_TASK: 14} and seen == [good[0]["audio_filepath"][:-4]]
    cfg["input_cfg"][0]["tags"] = {"task": "asr"}
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "val")
    seen = [i for b in loader for i in b.cut_ids]
    assert loader.skips.counts == {MISSING_AUDIO: 1, CORRUPT_AUDIO: 1, MISSING_FIELD: 4}  # 3 malformed lines
    assert len(seen) == 9 and loader.skips.kept == 9 and not loader.filtered.skipped
    cut = next(iter(read_manifest_cuts(tmp_path / "m.json")))
    cut.custom["task"] = "asr"
    seq = SequenceBuilder(tok, TINY_FRAMES, max_length=1024)(cut)
    assert tok.decode(seq.input_ids[seq.labels != IGNORE_INDEX]).startswith(f"Language: de\nTranscription: {sentence(0)}")


def test_tarred_bad_members_plan_and_nemo_loader(nemo_dir, tmp_path, tok):
    """A tarred shard with an undecodable member and a line without a member: counted skips. NeMo's own loader
    (use_multimodal_sampling: false) and the blend plan read the same items."""
    with tarfile.open(tmp_path / "audio_0.tar", "w") as tar:
        tar.add(nemo_dir / "wav" / "u0.wav", arcname="u0.wav")
        info = tarfile.TarInfo("junk.wav")
        info.size = 40
        tar.addfile(info, io.BytesIO(b"RIFF" + b"\x00" * 36))
    rows = [{"audio_filepath": "u0.wav", "duration": 0.5, "text": sentence(0)},
            {"audio_filepath": "junk.wav", "duration": 1.0, "text": "junk"},
            {"audio_filepath": "absent.wav", "duration": 1.0, "text": "absent"}]
    (tmp_path / "manifest_0.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    item = {"type": "nemo_tarred", "manifest_filepath": str(tmp_path / "manifest_0.json"),
            "tarred_audio_filepaths": str(tmp_path / "audio_0.tar"), "tags": {"task": "asr", "language": "en"},
            "blend": "asr_ast"}
    cfg = {"input_cfg": [item], "blend_epochs": {"asr_ast": 1.0}, "batch_size": 4, "max_length": 1024,
           "max_skip_rate": None, "use_multimodal_sampling": True, "num_workers": 0, "shuffle": False,
           "packing": {"enabled": False}}
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "val")
    assert [i for b in loader for i in b.cut_ids] == ["u0"]
    assert loader.skips.counts == {CORRUPT_AUDIO: 1, MISSING_AUDIO: 1}

    plain = {"type": "nemo", "manifest_filepath": str(nemo_dir / "manifest.json"), "tags": {"task": "asr", "language": "en"},
             "blend": "asr_ast"}
    plan = plan_blend({**cfg, "input_cfg": [plain]}, tok, TINY_FRAMES)
    assert plan.total_samples == 8 and plan.sources[0].mean_tokens > 250  # one 10 s window: 250 frames + text
    nemo_cfg = {**cfg, "input_cfg": [plain], "use_multimodal_sampling": False, "batch_duration": 2.0,
                "batch_size": None}
    batches = list(build_dataloader(nemo_cfg, tok, TINY_FRAMES, "train"))
    assert sorted(i for b in batches for i in b.cut_ids) == [f"wav/u{i}" for i in range(8)]
    assert all(b.tasks == ["asr"] * b.num_samples for b in batches)


def test_canary_style_nemo_manifest_gives_ast(nemo_dir, tmp_path, tok):
    """NeMo's Canary manifests (source_lang, answer = the translation): NeMo's lang_field item key and the
    translation_field tag map them; no code of their own."""
    rows = [{"audio_filepath": str(nemo_dir / "wav" / f"u{i}.wav"), "duration": 0.5 + 0.05 * i, "text": f"rot {i}",
             "source_lang": "de", "target_lang": "en", "taskname": "ast", "answer": f"red {i}"} for i in range(2)]
    (tmp_path / "canary.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"input_cfg": [{"type": "nemo", "manifest_filepath": str(tmp_path / "canary.json"), "lang_field": "source_lang",
                          "tags": {"task": "ast", "translation_field": "answer"}, "blend": "asr_ast"}],
           "blend_epochs": {"asr_ast": 1.0}, "batch_size": 4, "max_length": 1024, "use_multimodal_sampling": True,
           "num_workers": 0, "shuffle": False, "packing": {"enabled": False}}
    batch = next(iter(build_dataloader(cfg, tok, TINY_FRAMES, "val")))
    assert batch.num_samples == 2 and batch.tasks == ["ast", "ast"]
    answer = tok.decode(batch.input_ids[1][batch.labels[1] != IGNORE_INDEX])
    assert answer == "Language: de\nTranscription: rot 1\nTranslation: red 1<|im_end|>"


@pytest.mark.slow
def test_train_and_evaluate_from_a_plain_nemo_manifest(nemo_dir, tmp_path):
    items = [{"type": "nemo", "manifest_filepath": str(nemo_dir / "manifest.json"),
              "tags": {"task": "asr", "language": "en"}, "blend": "asr_ast"}]
    _, nemo = train_two_steps(items, tmp_path / "run")
    summary = eval_asr(nemo, nemo_dir / "manifest.json", tmp_path / "eval")
    assert summary.counts["total"] == 8 and summary.counts["scored"] == 8
    rows = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {f"wav/u{i}" for i in range(8)}
    assert {r["reference"]["text"] for r in rows} == {sentence(i) for i in range(8)}
    assert {r["reference"]["language"] for r in rows} == {"en"}  # the suite's default: the manifest has no lang


@pytest.mark.slow
def test_train_and_evaluate_from_a_tarred_nemo_manifest(nemo_dir, tmp_path):
    items = [{"type": "nemo_tarred", "manifest_filepath": str(nemo_dir / "tarred__OP_0..1_CL_.json"),
              "tarred_audio_filepaths": str(nemo_dir / "audio__OP_0..1_CL_.tar"),
              "tags": {"task": "asr", "language": "en"}, "blend": "asr_ast"}]
    _, nemo = train_two_steps(items, tmp_path / "run")
    summary = eval_asr(nemo, nemo_dir / "tarred__OP_0..1_CL_.json", tmp_path / "eval",
                       tarred_audio_filepaths=str(nemo_dir / "audio__OP_0..1_CL_.tar"))
    assert summary.counts["total"] == 8 and summary.counts["scored"] == 8


# ---- a Lhotse recipe's output ----------------------------------------------------------------------
@pytest.mark.slow
def test_train_from_lhotse_librispeech_recipe_output(tmp_path, capsys):
    part = tmp_path / "LibriSpeech" / "dev-clean"
    for spk, chap in ((19, 198), (26, 495)):
        folder = part / str(spk) / str(chap)
        folder.mkdir(parents=True)
        lines = []
        for u in range(4):
            (folder / f"{spk}-{chap}-{u:04d}.flac").write_bytes(tone_bytes(0.5 + 0.1 * u, 200 + 50 * u, "FLAC"))
            lines.append(f"{spk}-{chap}-{u:04d} {sentence(u + spk).upper()}")
        (folder / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    # Lhotse's own recipe, as `lhotse prepare librispeech` runs it
    manifests = prepare_librispeech(tmp_path / "LibriSpeech", dataset_parts="auto", output_dir=tmp_path / "m")
    cuts = CutSet.from_manifests(**manifests["dev-clean"])
    cuts.to_file(tmp_path / "recipe_cuts.jsonl.gz")
    assert len(cuts) == 8 and next(iter(cuts)).supervisions[0].language == "English"
    items = [{"type": "lhotse", "cuts_path": str(tmp_path / "recipe_cuts.jsonl.gz"),
              "tags": {"task": "asr", "language": "en"}, "blend": "asr_ast"}]
    train_two_steps(items, tmp_path / "run")

    # TTS from the same clean speech: the task written into the manifest, then pretokenize.py adds the codes
    (part / "26" / "495" / "26-495-0003.flac").unlink()
    tts = tmp_path / "tts.jsonl.gz"
    code = load_script("prepare_lhotse_cuts").main([
        "--recordings", str(tmp_path / "m" / "librispeech_recordings_dev-clean.jsonl.gz"),
        "--supervisions", str(tmp_path / "m" / "librispeech_supervisions_dev-clean.jsonl.gz"),
        "--task", "tts", "--language", "en", "-o", str(tts), "--max-skip-rate", "0.2"])
    printed = capsys.readouterr().out
    assert code == 0 and "prepare_lhotse_cuts: 7 kept, 1 skipped (12.50 %): missing_audio=1" in printed
    codes = tmp_path / "tts_codes.jsonl.gz"
    code = load_script("pretokenize").main([str(tts), "-o", str(codes), "--model-config",
                                            str(ROOT / "conf" / "model" / "tiny.yaml"), "--batch-size", "4"])
    assert code == 0, capsys.readouterr().out
    done = {c.id: c for c in CutSet.from_file(codes)}
    assert len(done) == 7 and schema.get_language(done["19-198-0002"]) == "en"
    assert schema.get_speech_codes(done["19-198-0002"], 256).shape == (35,)  # 0.7 s at 50 codes/s
    assert schema.get_transcript(done["19-198-0002"]) == sentence(21).upper()


def test_ast_translation_from_a_named_field(tmp_path, tok, capsys):
    """A CutSet built by Lhotse (RecordingSet + SupervisionSet) whose supervisions carry the translation under
    their own key: ``translation_field`` names it."""
    for i in range(3):
        (tmp_path / f"d{i}.flac").write_bytes(tone_bytes(0.6, 250 + 30 * i, "FLAC"))
    recs = RecordingSet.from_dir(tmp_path, pattern="*.flac")
    sups = SupervisionSet.from_segments([
        SupervisionSegment(id=r.id, recording_id=r.id, start=0, duration=r.duration, text=f"rot blau {i}",
                           language="de", custom={"en_text": f"red blue {i}"}) for i, r in enumerate(recs)])
    CutSet.from_manifests(recordings=recs, supervisions=sups).to_file(tmp_path / "de_en.jsonl.gz")
    cfg = {"input_cfg": [{"type": "lhotse", "cuts_path": str(tmp_path / "de_en.jsonl.gz"), "blend": "asr_ast",
                          "tags": {"task": "ast", "translation_field": "en_text"}}],
           "blend_epochs": {"asr_ast": 1.0}, "batch_size": 4, "max_length": 1024, "use_multimodal_sampling": True,
           "num_workers": 0, "shuffle": False, "packing": {"enabled": False}}
    loader = build_dataloader(cfg, tok, TINY_FRAMES, "val")
    batches = list(loader)
    assert loader.skips.skipped == 0 and sum(b.num_samples for b in batches) == 3
    labels = batches[0].labels[0]
    text = tok.decode(batches[0].input_ids[0][labels != IGNORE_INDEX])
    assert text.startswith("Language: de\nTranscription: rot blau 0\nTranslation: red blue 0")

    # the same tags written into a manifest (for the AST suite, which reads custom["translation"])
    script = load_script("prepare_lhotse_cuts")
    argv = [str(tmp_path / "de_en.jsonl.gz"), "--task", "ast", "-o", str(tmp_path / "ast.jsonl")]
    assert script.main([*argv, "--translation-field", "en_text"]) == 0
    cuts = sorted(CutSet.from_file(tmp_path / "ast.jsonl"), key=lambda c: c.custom["translation"])
    assert [schema.get_translation(c) for c in cuts] == [f"red blue {i}" for i in range(3)]
    assert script.main([*argv, "--translation-field", "fr_text"]) == 1  # no such field: every cut is skipped
    assert "prepare_lhotse_cuts: 0 kept, 3 skipped (100.00 %): missing_field=3" in capsys.readouterr().out


# ---- a Hugging Face dataset ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory) -> Path:
    """8 good rows (WAV and FLAC bytes) and 3 bad ones (undecodable bytes, empty text, no audio), saved to disk."""
    root = tmp_path_factory.mktemp("hf")
    audio = [{"bytes": tone_bytes(0.5 + 0.05 * i, 300 + 30 * i, "FLAC" if i % 2 else "WAV"),
              "path": f"clip{i}.{'flac' if i % 2 else 'wav'}"} for i in range(8)]
    text = [sentence(i) for i in range(8)]
    audio += [{"bytes": b"RIFFjunk", "path": "bad.wav"}, {"bytes": tone_bytes(0.5, 440), "path": "x.wav"}, None]
    text += ["corrupt audio", "", "no audio"]
    ds = datasets.Dataset.from_dict({"audio": audio, "text": text, "language": ["en"] * 11})
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    ds.save_to_disk(str(root / "ds"))
    return root


@pytest.mark.slow
def test_prepare_hf_dataset_then_train_and_evaluate(hf_dataset, tmp_path, capsys):
    out = tmp_path / "hf_cuts.jsonl.gz"
    code = load_script("prepare_hf_dataset").main([str(hf_dataset / "ds"), "--task", "asr", "--audio-column", "audio",
                                                   "--text-column", "text", "-o", str(out), "--max-skip-rate", "0.3"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "prepare_hf_dataset: 8 kept, 3 skipped (27.27 %)" in printed
    assert "corrupt_audio=1" in printed and "missing_audio=1" in printed and "missing_field=1" in printed
    cuts = {c.id: c for c in CutSet.from_file(out)}
    assert sorted(cuts) == [f"ds-{i:08d}" for i in range(8)]
    written = sorted(p.name for p in (tmp_path / "hf_cuts.audio").iterdir())
    assert written == [f"ds-{i:08d}.{'flac' if i % 2 else 'wav'}" for i in range(8)]  # bytes written once, as is
    assert all(s.type == "file" for c in cuts.values() for s in c.recording.sources)
    assert cuts["ds-00000003"].load_audio().shape == (1, int(16000 * 0.65))
    assert schema.get_transcript(cuts["ds-00000005"]) == sentence(5) and schema.get_language(cuts["ds-00000005"]) == "en"

    items = [{"type": "lhotse", "cuts_path": str(out), "blend": "asr_ast"}]
    _, nemo = train_two_steps(items, tmp_path / "run")
    summary = eval_asr(nemo, out, tmp_path / "eval")
    assert summary.counts["total"] == 8 and summary.counts["scored"] == 8


@pytest.mark.parametrize("task,extra,field,expected", [
    ("ast", ["--translation-column", "en"], "translation", "in English 2"),
    ("tts", [], None, sentence(2)),
    ("audio_qa", ["--question", "What is it?", "--answer-column", "text"], "answer", sentence(2)),
    ("tta", [], "caption", sentence(2)),
])
def test_prepare_hf_dataset_other_tasks(tmp_path, capsys, task, extra, field, expected):
    ds = datasets.Dataset.from_dict({"audio": [{"bytes": tone_bytes(0.5, 300 + 20 * i), "path": None} for i in range(3)],
                                     "text": [sentence(i) for i in range(3)], "en": [f"in English {i}" for i in range(3)]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "cuts.jsonl"
    code = load_script("prepare_hf_dataset").main([str(tmp_path / "ds"), "--task", task, "--language", "de",
                                                   "-o", str(out), *extra])
    assert code == 0, capsys.readouterr().out
    cut = CutSet.from_file(out)[2]
    assert schema.get_task(cut) == task
    assert (cut.custom[field] if field else schema.get_transcript(cut)) == expected
    assert (tmp_path / "cuts.audio" / "ds-00000002.wav").is_file()


def test_hf_rows_that_name_a_local_file(tmp_path):
    """Datasets loaded from a local folder (audiofolder) hold paths, not bytes: the file is used where it is."""
    script = load_script("prepare_hf_dataset")
    args = script.build_parser().parse_args([str(tmp_path), "--task", "asr", "--language", "en", "-o", "x.jsonl"])
    (tmp_path / "a.wav").write_bytes(tone_bytes(0.5, 300))
    row = {"audio": {"bytes": None, "path": "a.wav"}, "text": "red cat"}
    rec = script.check_row(row, args, script.text_columns(args), tmp_path, "ds-00000000")
    assert rec.id == "ds-00000000" and rec.sources[0].source == str(tmp_path / "a.wav") and rec.num_samples == 8000
    row["audio"]["path"] = "gone.wav"
    with pytest.raises(script.SkipSample) as e:
        script.check_row(row, args, script.text_columns(args), tmp_path, "ds-00000000")
    assert e.value.reason == MISSING_AUDIO


def test_hf_local_folders(hf_dataset, tmp_path, capsys):
    """A folder of parquet files (a copy of a hub dataset) reads like a saved one; an audiofolder needs torchcodec
    in datasets 5: with it the files are used where they are, without it the error names the way around."""
    script = load_script("prepare_hf_dataset")
    datasets.load_from_disk(str(hf_dataset / "ds")).select(range(8)).to_parquet(str(tmp_path / "pq" / "data" / "train.parquet"))
    code = script.main([str(tmp_path / "pq"), "--task", "asr", "-o", str(tmp_path / "pq.jsonl")])
    assert code == 0 and "prepare_hf_dataset: 8 kept, 0 skipped" in capsys.readouterr().out

    folder = tmp_path / "af"
    folder.mkdir()
    for i in range(2):
        (folder / f"a{i}.wav").write_bytes(tone_bytes(0.5, 300 + 50 * i))
    (folder / "metadata.csv").write_text("file_name,text\na0.wav,red cat\na1.wav,blue dog\n")
    argv = [str(folder), "--task", "asr", "--language", "en", "-o", str(tmp_path / "af.jsonl")]
    if not HAS_TORCHCODEC:
        with pytest.raises(SystemExit, match="scripts/prepare_tsv_pairs.py .*metadata.csv --audio-dir"):
            script.main(argv)
        return
    assert script.main(argv) == 0
    assert sorted(c.recording.sources[0].source for c in CutSet.from_file(tmp_path / "af.jsonl")) == \
        [str(folder / "a0.wav"), str(folder / "a1.wav")]
