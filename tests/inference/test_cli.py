"""Batch inference and the Hydra CLI: JSONL per input in order, WAVs, and every failure reported with its reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from lhotse import CutSet

from audex.data import schema
from audex.inference.pipelines import AudexPipeline
from audex.inference.runner import records_from_manifest, records_from_texts, records_from_wavs, run_inference
from audex.inference.waveform import write_wav
from audex.models.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return AudexPipeline(tiny_model)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_tts_batch_writes_wavs_and_reports_bad_inputs(pipe, tmp_path):
    records = records_from_texts(["Hello there.", "", "Birds sing."])
    records.insert(1, {"id": "broken", "error": "no file matches 'x*.wav'"})
    summary = run_inference(pipe, "tts", records, tmp_path / "tts.jsonl", batch_size=2,
                            sampling={"max_new_tokens": 8, "seed": 0}, wav_dir=tmp_path / "wav", progress=False)
    assert summary["ok"] == 2 and summary["failed"] == 2
    lines = read_jsonl(tmp_path / "tts.jsonl")
    assert [(x["id"], x["status"]) for x in lines] == [
        ("text_00000", "ok"), ("broken", "error"), ("text_00001", "error"), ("text_00002", "ok")]
    assert "needs the field 'text'" in lines[2]["error"] and "no file matches" in lines[1]["error"]
    for line in (lines[0], lines[3]):
        data, sr = sf.read(line["wav"])
        assert sr == 16000 and len(data) == line["codec_frames"] * 320


def test_voice_prompted_tts_records_from_texts_and_manifest(pipe, tmp_path, tone):
    write_wav(tmp_path / "ref.wav", tone(0.4))
    records = records_from_texts(["Good evening.", "See you."], voice=str(tmp_path / "ref.wav"),
                                 voice_text="a reference voice")
    records += records_from_texts(["No prompt here."])
    records.append({"id": "half", "text": "Hi.", "voice": str(tmp_path / "ref.wav")})       # no voice_text
    cut = schema.make_tts_cut("From a manifest.", speech_codes=[1, 2, 3], cut_id="m0", voice_codes=[4, 5, 6, 7],
                              voice_text="the manifest's voice")
    CutSet.from_cuts([cut]).to_file(tmp_path / "tts.jsonl")
    manifest = records_from_manifest(tmp_path / "tts.jsonl", "tts")
    assert manifest[0]["voice"].tolist() == [4, 5, 6, 7] and manifest[0]["voice_text"] == "the manifest's voice"
    summary = run_inference(pipe, "tts", records + manifest, tmp_path / "out.jsonl", batch_size=8,
                            sampling={"max_new_tokens": 6, "seed": 0}, wav_dir=tmp_path / "wav", progress=False)
    lines = read_jsonl(tmp_path / "out.jsonl")
    assert [x["status"] for x in lines] == ["ok", "ok", "ok", "error", "ok"] and summary["ok"] == 4
    assert "needs both inputs.voice" in lines[3]["error"]


def test_a_failing_input_inside_a_batch_is_isolated(pipe, tmp_path, tone):
    for name in ("a", "b", "c"):
        write_wav(tmp_path / f"{name}.wav", tone(0.5))
    records = records_from_wavs([str(tmp_path / "*.wav")], question="What is the sound?")
    records[1]["choices"] = [f"option {i}" for i in range(30)]  # more than (A)..(Z): the prompt builder refuses
    for r in (records[0], records[2]):
        r["choices"] = ["a dog", "a cat"]
    summary = run_inference(pipe, "mcq", records, tmp_path / "mcq.jsonl", batch_size=3,
                            sampling={"max_new_tokens": 4, "seed": 0}, progress=False)
    lines = read_jsonl(tmp_path / "mcq.jsonl")
    assert summary == {"ok": 2, "failed": 1, "output": str(tmp_path / "mcq.jsonl")}
    assert [x["status"] for x in lines] == ["ok", "error", "ok"]
    assert "2 to 26 choices" in lines[1]["error"]


def test_load_model_names_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="give a .nemo file"):
        load_model(tmp_path / "nope.nemo")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="expected a .nemo file"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.slow
def test_hydra_cli_end_to_end(tmp_path, tone):
    write_wav(tmp_path / "q.wav", tone(1.0))
    out = tmp_path / "asr.jsonl"
    cmd = [sys.executable, str(ROOT / "examples" / "audex_infer.py"), f"model.path={ROOT / 'conf/model/tiny.yaml'}",
           "task=asr", f"inputs.wav=[{tmp_path / 'q.wav'},{tmp_path / 'missing.wav'}]", "sampling.max_new_tokens=4",
           f"output.jsonl={out}", "progress=false", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = read_jsonl(out)
    assert [(x["id"], x["status"]) for x in lines] == [("q", "ok"), ("missing", "error")]
    assert "file not found" in lines[1]["error"] and "fields" in lines[0]
