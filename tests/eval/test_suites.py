"""Every suite end to end on the tiny model with generated fixtures: files written, numbers recomputable from
the per-sample records, bad input reported per sample, resume skipping what is done."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import jiwer
import numpy as np
import pytest
import sacrebleu
import soundfile as sf
import torch

from audex.eval.engine import EvalEngine
from audex.eval.samples import EvalSample, load_samples
from audex.eval.suites import (
    AsrSuite,
    AstSuite,
    EntailmentSuite,
    HallucinationSuite,
    McqSuite,
    NoisyAsrSuite,
    ResumeMismatchError,
    SpeechToSpeechSuite,
    TextRetentionSuite,
    TtaSuite,
    TtsSuite,
)

# short decodes: the tiny model has random weights, so only the plumbing is under test
GENERATION = {name: {"max_new_tokens": 6} for name in
              ("asr", "asr_multilingual", "ast", "mcq", "entailment", "hallucination")}
GENERATION["chat"] = {"max_new_tokens": 6, "do_sample": False}
GENERATION["tts"] = {"max_new_tokens": 16}
PRESET_OVERRIDES = ["tta.audio_seconds=0.2", "tta.sampling.max_new_tokens=42"]  # 40 codes = 0.2 s instead of 10 s

SENTENCES = {"u0": "the cat sat on the mat", "u1": "hello world", "u2": "twenty five birds flew south"}


class CountingEngine:
    """Counts the samples that reach each engine method (to see what a resumed run regenerates)."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        method = getattr(self.engine, name)
        if not callable(method):
            return method

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + (len(args[0]) if args else 0)
            return method(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def engine(tiny_model):
    return EvalEngine(tiny_model, seed=0, generation=GENERATION, preset_overrides=PRESET_OVERRIDES)


def _speech(text: str, path, seed: int):
    """espeak-ng speech when installed, else a two-tone stand-in."""
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        return
    t = np.arange(16000) / 16000
    sf.write(path, 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) * np.sin(2 * np.pi * 3 * t), 16000)


@pytest.fixture(scope="module")
def speech_folder(tmp_path_factory):
    """Audio folder + reference JSONL with every kind of bad input next to three good samples."""
    root = tmp_path_factory.mktemp("speech")
    audio = root / "audio"
    audio.mkdir()
    lines = []
    for i, (sid, text) in enumerate(SENTENCES.items()):
        _speech(text, audio / f"{sid}.wav", i)
        lines.append(json.dumps({"id": sid, "text": text}))
    (audio / "corrupt.wav").write_bytes(b"RIFF not really a wav file")
    lines.append(json.dumps({"id": "corrupt", "text": "this file is broken"}))
    lines.append(json.dumps({"id": "gone", "text": "this file does not exist"}))
    lines.append(json.dumps({"id": "u0", "text": "a duplicate id"}))
    shutil.copy(audio / "u0.wav", audio / "noref.wav")
    lines.append(json.dumps({"id": "noref"}))               # audio, but no transcript
    shutil.copy(audio / "u1.wav", audio / "orphan.wav")     # audio no line names
    lines.append("{not json")
    (root / "refs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _records(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# ---- ASR ------------------------------------------------------------------------------------------
def test_asr_end_to_end_bad_input_and_resume(engine, speech_folder, tmp_path):
    samples, problems = load_samples(references=speech_folder / "refs.jsonl", folder=speech_folder / "audio")
    counting = CountingEngine(engine)
    suite = AsrSuite({"benchmark": "openasr/librispeech_clean"}, engine=counting)
    summary = suite.run(samples, tmp_path, "tiny", problems=problems, batch_size=2, progress=False)

    for name in ("samples.jsonl", "summary.json", "summary.md", "run.json"):
        assert (tmp_path / name).exists()
    assert summary.counts == {"total": 9, "scored": 3, "errors": 6}
    assert summary.error_reasons == {"missing_audio": 1, "audio_load_failed": 1, "missing_reference": 1,
                                     "duplicate_id": 1, "unmatched_id": 1, "unreadable_reference_line": 1}
    records = {r["id"]: r for r in _records(tmp_path)}
    assert records["gone"]["reason"] == "missing_audio" and "gone.wav" in records["gone"]["detail"]
    assert records["corrupt"]["reason"] == "audio_load_failed"
    # the corpus WER is total errors / total words of the records, and what jiwer gives on the same strings
    scored = [r for r in records.values() if r["status"] == "scored"]
    refs = [r["reference_normalized"] for r in scored]
    hyps = [r["hypothesis_normalized"] for r in scored]
    assert summary.metrics["wer"] == pytest.approx(100 * jiwer.wer(refs, hyps))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["metrics"]["wer"] == pytest.approx(summary.metrics["wer"])
    md = (tmp_path / "summary.md").read_text()
    assert "Table 8" in md and "**this run**" in md and "missing_audio" in md
    assert counting.calls["asr"] == 3  # only the good samples reach the engine

    # resume: nothing is generated again
    counting.calls.clear()
    again = suite.run(samples, tmp_path, "tiny", problems=problems, batch_size=2, progress=False)
    assert counting.calls == {} and again.metrics["wer"] == pytest.approx(summary.metrics["wer"])
    # an interrupted run (last record torn off mid-line) regenerates exactly that sample
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    last_scored = max(i for i, line in enumerate(lines) if '"status": "scored"' in line)
    torn = lines[:last_scored] + [lines[last_scored][:25]] + lines[last_scored + 1:]
    (tmp_path / "samples.jsonl").write_text("\n".join(torn))
    suite.run(samples, tmp_path, "tiny", problems=problems, batch_size=2, progress=False)
    assert counting.calls == {"asr": 1}
    # a different model in the same folder is refused
    with pytest.raises(ResumeMismatchError, match="different run"):
        suite.run(samples, tmp_path, "another-model", problems=problems, progress=False)


def test_lhotse_manifest_input(engine, speech_folder, tmp_path):
    """A CutSet written with the data pipeline's schema: transcript, language and custom fields become reference
    fields; a recording whose file vanished is reported for that cut."""
    from lhotse import CutSet, Recording

    from audex.data.schema import make_asr_cut, make_ast_cut

    audio = speech_folder / "audio"
    cuts = [make_asr_cut(Recording.from_file(audio / "u0.wav"), SENTENCES["u0"], "en", cut_id="c0"),
            make_ast_cut(Recording.from_file(audio / "u1.wav"), "hallo welt", "de", "hello world", cut_id="c1")]
    shutil.copy(audio / "u2.wav", tmp_path / "vanishing.wav")
    cuts.append(make_asr_cut(Recording.from_file(tmp_path / "vanishing.wav"), SENTENCES["u2"], "en", cut_id="c2"))
    (tmp_path / "vanishing.wav").unlink()
    CutSet.from_cuts(cuts).to_file(tmp_path / "cuts.jsonl.gz")

    samples, problems = load_samples(manifest=tmp_path / "cuts.jsonl.gz")
    assert problems == [] and [s.id for s in samples] == ["c0", "c1", "c2"]
    assert samples[1].fields["language"] == "de" and samples[1].fields["translation"] == "hello world"
    assert samples[0].load_audio().shape[0] == pytest.approx(sf.info(audio / "u0.wav").duration * 16000, abs=2)
    summary = AsrSuite({}, engine=engine).run(samples, tmp_path / "out", "tiny", progress=False)
    assert summary.counts == {"total": 3, "scored": 2, "errors": 1}
    assert summary.error_reasons == {"audio_load_failed": 1}
    assert set(summary.breakdowns["WER per language"]) == {"en", "de"}


def test_asr_scores_precomputed_hypotheses_exactly(tmp_path):
    """No model: per-language WER and the paper's per-language table, missing/unmatched/empty hypotheses."""
    samples = [EvalSample("de1", {"text": "Guten Morgen, Welt!", "language": "de"}),
               EvalSample("de2", {"text": "Das ist gut.", "language": "de"}),
               EvalSample("fr1", {"text": "Bonjour tout le monde", "language": "fr"}),
               EvalSample("fr2", {"text": "Merci beaucoup", "language": "fr"}),
               EvalSample("fr3", {"text": "Oui", "language": "fr"})]
    hypotheses = {"de1": "guten morgen welt", "de2": "das ist nicht gut", "fr1": "bonjour le monde", "fr3": "",
                  "xx9": "stray"}
    suite = AsrSuite({"benchmark": "fleurs_asr"}, hypotheses=hypotheses)
    summary = suite.run(samples, tmp_path, "external system", progress=False)
    # de: 0 + 1 insertion over 3 + 3 words; fr: 1 deletion over 4 words + 1 deletion over 1 (fr2 has no hypothesis)
    assert summary.breakdowns["WER per language"]["de"]["wer"] == pytest.approx(100 * 1 / 6)
    assert summary.breakdowns["WER per language"]["fr"]["wer"] == pytest.approx(100 * 2 / 5)
    assert summary.metrics["wer"] == pytest.approx(100 * 3 / 11)
    assert summary.metrics["wer_language_average"] == pytest.approx((100 / 6 + 40) / 2)
    assert summary.error_reasons == {"missing_hypothesis": 1, "unmatched_id": 1}
    assert summary.flags == {"empty_hypothesis": 1}
    assert {c.benchmark for c in summary.comparisons} == {"fleurs_asr/de", "fleurs_asr/fr", "fleurs_asr/average"}
    assert (tmp_path / "wer_per_language.png").stat().st_size > 1000
    assert "wer_per_language.png" in (tmp_path / "summary.md").read_text()


def test_generation_failure_is_isolated_to_its_sample(engine, speech_folder, tmp_path):
    class Flaky:
        def asr(self, audios, languages=None):
            if any(a.numel() == 12345 for a in audios):
                raise RuntimeError("decoder blew up")
            return engine.asr(audios, languages)

    samples = [EvalSample(f"ok{i}", {"text": "hello"}, None, lambda: torch.randn(16000) * 0.1) for i in range(2)]
    samples.insert(1, EvalSample("boom", {"text": "hello"}, None, lambda: torch.randn(12345) * 0.1))
    summary = AsrSuite({}, engine=Flaky()).run(samples, tmp_path, "tiny", batch_size=3, progress=False)
    records = {r["id"]: r for r in _records(tmp_path)}
    assert records["boom"]["reason"] == "generation_failed" and "decoder blew up" in records["boom"]["detail"]
    assert records["ok0"]["status"] == records["ok1"]["status"] == "scored"
    assert summary.counts["scored"] == 2


def test_noisy_asr_per_level_and_plot(engine, speech_folder, tmp_path):
    samples = [s for s in load_samples(references=speech_folder / "refs.jsonl", folder=speech_folder / "audio")[0]
               if s.id in ("u0", "u1")]
    cfg = {"benchmark": "noisy_librispeech", "snr_levels_db": [-5, 10, 100], "noise": {"synthetic": "pink"}, "seed": 3}
    summary = NoisyAsrSuite(cfg, engine=engine).run(samples, tmp_path, "tiny", batch_size=3, progress=False)
    records = _records(tmp_path)
    assert sorted(r["id"] for r in records) == ["u0@-5dB", "u0@100dB", "u0@10dB", "u1@-5dB", "u1@100dB", "u1@10dB"]
    for r in records:
        assert abs(r["reference"]["achieved_snr_db"] - r["reference"]["snr_db"]) < 0.1
    levels = summary.breakdowns["WER per SNR level"]
    assert list(levels) == ["-5 dB", "10 dB", "100 dB"]
    assert summary.metrics["wer_average"] == pytest.approx(np.mean([row["wer"] for row in levels.values()]))
    assert (tmp_path / "wer_per_snr.png").exists()
    assert "noisy_librispeech/snr_-5" in {c.benchmark for c in summary.comparisons}


# ---- AST ------------------------------------------------------------------------------------------
def test_ast_bleu_and_comet_not_computed(engine, speech_folder, tmp_path):
    speech = {s.id: s for s in load_samples(references=speech_folder / "refs.jsonl", folder=speech_folder / "audio")[0]}
    samples = [EvalSample(sid, {"text": text, "language": "de", "translation": text}, None, speech[sid].audio_loader)
               for sid, text in SENTENCES.items()]
    samples.append(EvalSample("notr", {"text": "x", "language": "de"}, None, lambda: torch.zeros(1600)))
    summary = AstSuite({"benchmark": "fleurs_ast"}, engine=engine).run(samples, tmp_path, "tiny", progress=False)
    scored = [r for r in _records(tmp_path) if r["status"] == "scored"]
    hyps = [r["hypothesis"] for r in scored]
    assert summary.metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [[r["reference"]["translation"] for r in scored]]).score)
    assert "not computed" in str(summary.metrics["comet"]) and "COMET" in (tmp_path / "summary.md").read_text()
    assert summary.error_reasons == {"missing_reference": 1}
    assert {c.benchmark for c in summary.comparisons} == {"fleurs_ast/de"}


# ---- audio QA -------------------------------------------------------------------------------------
def _tone_sample(sid, fields, freq=440.0):
    t = torch.arange(8000) / 16000
    return EvalSample(sid, fields, None, lambda: 0.3 * torch.sin(2 * math.pi * freq * t))


def test_qa_suites_end_to_end(engine, tmp_path):
    choices = ["cat meowing", "dog barking", "rain", "car horn"]
    mcq = [_tone_sample("m1", {"question": "What is heard?", "choices": choices, "answer": "rain", "category": "sound"}),
           _tone_sample("m2", {"question": "What is heard?", "choices": choices, "answer": "(B)", "category": "music"}),
           _tone_sample("m3", {"question": "What is heard?", "choices": choices, "answer": "a bird"}),  # invalid gold
           _tone_sample("m4", {"question": "What is heard?", "choices": ["only one"], "answer": "A"})]
    s = McqSuite({"benchmark": "mmau"}, engine=engine).run(mcq, tmp_path / "mcq", "tiny", progress=False)
    assert s.counts["scored"] == 2 and s.error_reasons == {"invalid_reference": 2}
    recs = [r for r in _records(tmp_path / "mcq") if r["status"] == "scored"]
    assert s.metrics["accuracy"] == pytest.approx(50.0 * sum(r["correct"] for r in recs))
    assert {c.benchmark for c in s.comparisons} == {"mmau/sound", "mmau/music", "mmau/average"}

    ent = [_tone_sample("e1", {"description": "A dog barks.", "answer": "Yes"}),
           _tone_sample("e2", {"hypothesis": "Rain falls.", "answer": "maybe"}),
           _tone_sample("e3", {"description": "Silence.", "answer": "perhaps"})]
    s = EntailmentSuite({"benchmark": "audio_entailment/clotho_v2"}, engine=engine).run(ent, tmp_path / "ent", "tiny", progress=False)
    assert s.counts["scored"] == 2 and s.error_reasons == {"invalid_reference": 1}
    hal = [_tone_sample("h1", {"sound_event": "a dog barking", "answer": "no"}),
           _tone_sample("h2", {"answer": "yes"})]
    s = HallucinationSuite({"benchmark": "cmm_hallucination"}, engine=engine).run(hal, tmp_path / "hal", "tiny", progress=False)
    assert s.counts["scored"] == 1 and s.error_reasons == {"missing_reference": 1}
    assert (tmp_path / "hal" / "summary.md").read_text().count("CMM") >= 1


def test_mcq_accuracy_from_scripted_answers(tmp_path):
    choices = ["cat", "dog", "rain on a roof", "car"]
    samples = [EvalSample(f"q{i}", {"question": "?", "choices": choices, "answer": a})
               for i, a in enumerate(["A", "B", "rain on a roof", "D"])]
    outputs = {"q0": "(A)", "q1": "The answer is C.", "q2": "It sounds like rain on a roof.", "q3": "I cannot tell."}
    s = McqSuite({"benchmark": "mmar"}, hypotheses=outputs).run(samples, tmp_path, "scripted", progress=False)
    assert s.metrics["accuracy"] == pytest.approx(50.0)
    assert s.flags == {"no_answer_extracted": 1}
    assert s.breakdowns["predicted answers"] == {"(none)": {"samples": 1}, "A": {"samples": 1}, "C": {"samples": 2}}


# ---- generation -----------------------------------------------------------------------------------
def test_tts_wer_and_speaker_similarity(engine, speech_folder, speaker_model_dir, tmp_path):
    audio = speech_folder / "audio"
    speech = {s.id: s for s in load_samples(references=speech_folder / "refs.jsonl", folder=audio)[0]}
    samples = [EvalSample("t0", {"text": "Hello world."}, str(audio / "u0.wav"), speech["u0"].audio_loader),
               EvalSample("t1", {"text": "The cat sat on the mat."}),
               EvalSample("t2", {})]
    suite = TtsSuite({"benchmark": "seed_tts_eval/en", "speaker_model": str(speaker_model_dir),
                      "speaker_reference_audio": str(audio / "u1.wav")}, engine=engine)
    summary = suite.run(samples, tmp_path, "tiny", progress=False)
    assert summary.counts == {"total": 3, "scored": 2, "errors": 1}
    recs = [r for r in _records(tmp_path) if r["status"] == "scored"]
    for r in recs:
        wav, sr = sf.read(tmp_path / r["audio"])
        assert sr == 16000 and len(wav) > 0
        assert -100.0 <= r["speaker_similarity"] <= 100.0
    assert summary.metrics["speaker_similarity"] == pytest.approx(np.mean([r["speaker_similarity"] for r in recs]))
    total = sum(r["counts"]["substitutions"] + r["counts"]["deletions"] + r["counts"]["insertions"] for r in recs)
    assert summary.metrics["wer"] == pytest.approx(100 * total / sum(r["counts"]["reference_words"] for r in recs))
    md = (tmp_path / "summary.md").read_text()
    assert "NOT comparable" in md and "Table 6" in md  # judged by the model itself, not by Whisper


def test_tts_without_speaker_model_reports_sim_not_computed(engine):
    record = {"id": "t", "status": "scored", "flags": [], "seconds": 1.0, "speaker_similarity": None,
              "counts": {"substitutions": 1, "deletions": 0, "insertions": 0, "reference_words": 4}}
    summary = TtsSuite({"benchmark": "seed_tts_eval/en", "asr_model": "hf:/models/whisper"}, engine=engine)._summarize([record], "m")
    assert summary.metrics["wer"] == pytest.approx(25.0)
    assert "no speaker_model configured" in str(summary.metrics["speaker_similarity"])
    # judged by a Whisper-like ASR, the WER is ranked among Table 6's fixed-voice column
    assert [(c.metric, c.comparable) for c in summary.comparisons] == [("wer_fixed_voice", True)]


def test_tta_frechet_distance_with_labelled_fallback(engine, tmp_path):
    samples = [_tone_sample(f"a{i}", {"caption": c}, freq=300 + 200 * i)
               for i, c in enumerate(["birds chirping", "a car passes by", "rain on a tin roof"])]
    samples.append(EvalSample("nocap", {}))
    suite = TtaSuite({"benchmark": "audiocaps", "clip_seconds": 0.5, "embedding": {"kind": "logmel", "hop_seconds": 0.1}},
                     engine=engine)
    summary = suite.run(samples, tmp_path, "tiny", progress=False)
    assert summary.counts["scored"] == 3 and summary.error_reasons == {"missing_reference": 1}
    recs = [r for r in _records(tmp_path) if r["status"] == "scored"]
    gen = np.concatenate([np.load(tmp_path / r["generated_embedding"]) for r in recs])
    ref = np.concatenate([np.load(tmp_path / r["reference_embedding"]) for r in recs])
    from audex.eval.metrics import frechet_distance_between

    assert summary.metrics["fd_logmel"] == pytest.approx(frechet_distance_between(gen, ref), rel=1e-5)
    assert "fd_openl3" not in summary.metrics
    for r in recs:
        assert sf.info(tmp_path / r["audio"]).duration == pytest.approx(0.2, abs=0.01)
    md = (tmp_path / "summary.md").read_text()
    assert "FALLBACK" in md and "NOT comparable" in md and "Table 7" in md


# ---- speech to speech and text retention ----------------------------------------------------------
def test_s2s_cascade_accuracy(engine, speech_folder, tmp_path):
    samples = load_samples(references=speech_folder / "refs.jsonl", folder=speech_folder / "audio")[0][:2]
    for s, answer in zip(samples, ["valid", "7"]):
        s.fields["answer"] = answer
    summary = SpeechToSpeechSuite({"benchmark": "bigbenchaudio"}, engine=engine).run(samples, tmp_path, "tiny", progress=False)
    recs = _records(tmp_path)
    assert summary.counts["scored"] == 2
    for r in recs:
        assert (tmp_path / r["audio"]).exists() and "heard" in r and "response" in r
    assert summary.metrics["accuracy"] == pytest.approx(50.0 * sum(r["correct"] for r in recs))
    assert "spoken_accuracy" in summary.metrics and "Table 13" in (tmp_path / "summary.md").read_text()


def test_text_retention_loss_and_accuracy(tiny_model, engine, tiny_yaml, tmp_path):
    from audex.models.audex_model import AudexModel

    torch.manual_seed(1)
    baseline = EvalEngine(AudexModel.from_config_file(str(tiny_yaml)).eval(), seed=0, generation=GENERATION)
    chat = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    samples = [EvalSample("c1", {"messages": chat}),
               EvalSample("c2", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}),
               EvalSample("q1", {"question": "Which is a colour?", "choices": ["red", "seven"], "answer": "A"}),
               EvalSample("bad", {"messages": [{"role": "user", "content": "no answer turn"}]})]
    suite = TextRetentionSuite({}, engine=engine, baseline_engine=baseline)
    summary = suite.run(samples, tmp_path, "tiny", progress=False)
    assert summary.counts["scored"] == 3 and summary.error_reasons == {"invalid_reference": 1}
    recs = {r["id"]: r for r in _records(tmp_path)}
    # the candidate's loss on c1 equals cross-entropy of the model's logits on the assistant tokens, by hand
    enc = engine.pipeline.formatter.encode_dialog(chat)
    ids, mask = enc["input_ids"], enc["mask"]
    with torch.no_grad():
        logits = tiny_model(input_ids=ids[None]).logits[0, :-1].float()
    by_hand = torch.nn.functional.cross_entropy(logits[mask[1:]], ids[1:][mask[1:]]).item()
    assert recs["c1"]["candidate"]["loss"] == pytest.approx(by_hand, rel=1e-4)
    assert recs["c1"]["candidate"]["loss"] != pytest.approx(recs["c1"]["baseline"]["loss"])
    tokens = sum(recs[c]["candidate"]["tokens"] for c in ("c1", "c2"))
    nll = sum(recs[c]["candidate"]["nll"] for c in ("c1", "c2"))
    assert summary.metrics["loss_candidate"] == pytest.approx(nll / tokens)
    assert summary.metrics["loss_delta"] == pytest.approx(summary.metrics["loss_candidate"] - summary.metrics["loss_baseline"])
    assert summary.metrics["accuracy_delta"] == pytest.approx(summary.metrics["accuracy_candidate"] - summary.metrics["accuracy_baseline"])
    paper = summary.breakdowns["paper: text retention, Audex 30B-A3B vs its backbone (Table 1)"]
    assert paper["MMLU-Pro"] == {"backbone": 79.8, "audex": 78.9, "delta": -0.9}
    with pytest.raises(ValueError, match="baseline_model"):
        TextRetentionSuite({}, engine=engine)


# ---- the command line -----------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def test_cli_config_runs_a_nemo_checkpoint(tiny_model, speech_folder, tmp_path):
    """examples/audex_eval.py's config (conf/eval) composed by Hydra, a .nemo restored, the suite run."""
    import importlib.util

    from hydra import compose, initialize_config_dir

    from audex.eval.runner import run_eval

    nemo = tmp_path / "tiny.nemo"
    tiny_model.save_to(str(nemo))
    out = tmp_path / "eval"
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "eval"), version_base="1.3"):
        cfg = compose("eval", overrides=[
            f"model={nemo}", "suite=asr", f"references={speech_folder / 'refs.jsonl'}", f"folder={speech_folder / 'audio'}",
            f"output_dir={out}", "+generation.asr.max_new_tokens=6", "progress=false", "batch_size=4", "limit=3",
            "suite.benchmark=openasr/librispeech_clean"])
    assert cfg.suite.benchmark == "openasr/librispeech_clean" and list(cfg.suite.keys())[0] == "name"
    summary = run_eval(cfg)
    assert summary.suite == "asr" and summary.model == str(nemo)
    assert summary.counts["scored"] == 3 and json.loads((out / "summary.json").read_text())["counts"]["scored"] == 3
    spec = importlib.util.spec_from_file_location("audex_eval_cli", ROOT / "examples" / "audex_eval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert callable(cli.main)
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "eval"), version_base="1.3"):
        for name in ("noisy_asr", "ast", "mcq", "entailment", "hallucination", "tts", "tta", "s2s", "text"):
            assert compose("eval", overrides=[f"suite={name}", "model=x"]).suite.name == name
