"""Preparation scripts and pre-tokenisation, run in-process on fixtures generated here."""

import gzip
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from data_scripts import ROOT, load_script
from lhotse import CutSet

from audex.data import schema
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder, load_cut_audio
from audex.tokenizer import AudexTokenizer
from audex.vocab import AudexVocab


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny(AudexVocab(), bpe_size=512)


@pytest.fixture
def write_audio(tone):
    def write(path: Path, seconds: float, freq: float = 440.0, sr: int = 16000):
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone(seconds, freq, sr=sr).numpy(), sr)
        return path
    return write


def run(script, argv, capsys):
    code = load_script(script).main([str(a) for a in argv])
    return code, capsys.readouterr().out


def built_tasks(tok, path):
    builder = SequenceBuilder(tok, max_length=8192)
    return {c.id: builder(c) for c in CutSet.from_file(path)}


def test_librispeech(tmp_path, write_audio, capsys, tok):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    write_audio(root / "19/198/19-198-0000.flac", 0.8, 300)
    write_audio(root / "19/198/19-198-0001.flac", 1.2, 500)
    (root / "19/198/19-198.trans.txt").write_text(
        "19-198-0000 NORTHANGER ABBEY\n19-198-0001 WAS WRITTEN BY JANE\n19-198-0002 THIS ONE HAS NO AUDIO\n")
    write_audio(root / "26/495/26-495-0001.flac", 0.5)
    (root / "26/495/26-495-0000.flac").write_bytes(b"fLaC" + b"\x00" * 40)
    (root / "26/495/26-495.trans.txt").write_text("26-495-0000 CORRUPT FILE\n26-495-0001 FINE\n26-495-0002\n")
    out = tmp_path / "ls.jsonl.gz"
    code, printed = run("prepare_librispeech", [root, "-o", out, "--tasks", "asr,tts", "--max-skip-rate", "0.6"], capsys)
    assert code == 0
    assert "prepare_librispeech: 6 kept, 3 skipped (33.33 %)" in printed
    assert "corrupt_audio=1" in printed and "missing_audio=1" in printed and "missing_field=1" in printed
    cuts = {c.id: c for c in CutSet.from_file(out)}
    assert sorted(cuts) == sorted(f"{u}_{t}" for u in ("19-198-0000", "19-198-0001", "26-495-0001")
                                  for t in ("asr", "tts"))
    asr = cuts["19-198-0001_asr"]
    assert schema.get_transcript(asr) == "WAS WRITTEN BY JANE" and asr.duration == pytest.approx(1.2)
    assert load_cut_audio(asr).shape == (19200,)
    assert schema.get_task(cuts["19-198-0001_tts"]) == "tts" and cuts["19-198-0001_tts"].has_recording
    seq = SequenceBuilder(tok)(asr)
    assert tok.decode(seq.input_ids[seq.labels != IGNORE_INDEX]) == \
        "Language: en\nTranscription: WAS WRITTEN BY JANE<|im_end|>"
    # the same corpus with a strict threshold fails, with the summary printed
    code, printed = run("prepare_librispeech", [root, "-o", tmp_path / "strict.jsonl", "--max-skip-rate", "0.1"], capsys)
    assert code == 1 and "ERROR: prepare_librispeech: 3 of 6 examples (50.00 %) were skipped" in printed


def test_tsv_pairs_covost_and_fleurs(tmp_path, write_audio, capsys, tok):
    clips = tmp_path / "clips"
    for name in ("a", "b", "c"):
        write_audio(clips / f"{name}.wav", 0.6)
    table = tmp_path / "covost.tsv"
    table.write_text("path\tsentence\ttranslation\tclient_id\n"
                     "a.wav\tGuten Morgen\tGood morning\tx\n"
                     'b.wav\tEr sagte "hallo\tHe said "hello\tx\n'
                     "c.wav\tOhne Übersetzung\t\tx\n"
                     "d.wav\tKeine Datei\tNo file\tx\n", encoding="utf-8")
    out = tmp_path / "covost.jsonl"
    code, printed = run("prepare_tsv_pairs", [table, "--audio-dir", clips, "--language", "de", "--tasks", "ast,asr",
                                              "-o", out, "--max-skip-rate", "0.5"], capsys)
    assert code == 0 and "5 kept, 2 skipped" in printed and "missing_field=1" in printed and "missing_audio=1" in printed
    seqs = built_tasks(tok, out)
    assert sorted(seqs) == ["a_asr", "a_ast", "b_asr", "b_ast", "c_asr"]
    b = seqs["b_ast"]
    assert tok.decode(b.input_ids[b.labels != IGNORE_INDEX]) == \
        'Language: de\nTranscription: Er sagte "hallo\nTranslation: He said "hello<|im_end|>'

    fleurs = tmp_path / "fleurs.tsv"  # FLEURS: no header
    fleurs.write_text("1001\ta.wav\tBonjour à tous.\tbonjour à tous\tw\t9600\tFEMALE\n", encoding="utf-8")
    out = tmp_path / "fleurs.jsonl"
    code, _ = run("prepare_tsv_pairs", [fleurs, "--audio-dir", clips, "--language", "fr", "--tasks", "asr",
                                        "--column-names", "id,path,raw,sentence,words,num_samples,gender",
                                        "--id-column", "id", "--transcript-column", "raw", "--language-in-prompt",
                                        "-o", out], capsys)
    assert code == 0
    seq = built_tasks(tok, out)["1001_asr"]
    text = tok.decode(seq.input_ids)
    assert "Transcribe the speech in the input audio\nLanguage: fr<|im_end|>" in text
    assert text.endswith("Language: fr\nTranscription: Bonjour à tous.<|im_end|>")

    with pytest.raises(SystemExit, match="no column"):
        run("prepare_tsv_pairs", [table, "--audio-dir", clips, "--language", "de", "--transcript-column", "text",
                                  "-o", tmp_path / "x.jsonl"], capsys)


def test_audiocaps(tmp_path, write_audio, capsys, tok):
    audio = tmp_path / "audio"
    write_audio(audio / "91139.wav", 10.0, 220)
    write_audio(audio / "58146.wav", 3.0, 880)
    table = tmp_path / "train.csv"
    table.write_text("audiocap_id,youtube_id,start_time,caption\n"
                     '91139,r1nicOVtvkQ,130,"A woman talks, then a dog barks"\n'
                     "58146,UDGBjjwyaqE,20,Birds chirping in a forest\n"
                     "11111,missingYTid,0,Wind blowing\n")
    out = tmp_path / "ac.jsonl.gz"
    code, printed = run("prepare_audiocaps", [table, "--audio-dir", audio, "-o", out, "--max-skip-rate", "0.5"], capsys)
    assert code == 0 and "4 kept, 1 skipped" in printed and "missing_audio=1" in printed
    cuts = {c.id: c for c in CutSet.from_file(out)}
    assert sorted(cuts) == ["58146_caption", "58146_tta", "91139_caption", "91139_tta"]
    assert schema.get_caption(cuts["91139_tta"]) == "A woman talks, then a dog barks"
    assert cuts["91139_tta"].has_recording and not schema.has_codes(cuts["91139_tta"])
    seq = SequenceBuilder(tok)(cuts["58146_caption"])
    text = tok.decode(seq.input_ids)
    assert "<so_end>\nDescribe the audio<|im_end|>" in text and seq.num_audio_frames == [750]
    assert text.endswith("<think></think>\nBirds chirping in a forest<|im_end|>")


def test_audio_qa_jsonl(tmp_path, write_audio, capsys, tok):
    write_audio(tmp_path / "clips/long.wav", 4.0)
    rows = [
        {"id": "q1", "audio": "clips/long.wav", "question": "<sound>\nWhat do you hear?", "answer": "A steady tone."},
        {"id": "q2", "audio": "clips/long.wav", "question": "Is it loud?", "answer": "No.", "offset": 1.0,
         "duration": 2.0},
        {"id": "q3", "audio": "clips/long.wav", "question": "Too far?", "answer": "Yes.", "offset": 3.5, "duration": 2},
        {"id": "q4", "audio": "clips/long.wav", "question": "No answer?"},
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    out = tmp_path / "qa_cuts.jsonl"
    code, printed = run("prepare_audio_qa", [jsonl, "-o", out, "--max-skip-rate", "0.7"], capsys)
    assert code == 0 and "2 kept, 3 skipped" in printed
    assert "invalid_segment=1" in printed and "missing_field=2" in printed
    cuts = {c.id: c for c in CutSet.from_file(out)}
    assert schema.get_question(cuts["q1"]) == "What do you hear?"  # the literal <sound> was removed
    assert cuts["q2"].start == 1.0 and cuts["q2"].duration == 2.0
    seq = SequenceBuilder(tok)(cuts["q2"])
    assert seq.audios[0].numel() == 32000 and seq.input_ids.tolist().count(tok.sound) == 0


def test_chat_jsonl(tmp_path, capsys, tok):
    rows = [
        {"id": "think1", "messages": [{"role": "user", "content": "2+2?"},
                                      {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]},
        {"id": "think2", "messages": [{"role": "system", "content": "Be terse."},
                                      {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
                                      {"role": "assistant", "content": "<think>\nRecall.\n</think>\nParis"}]},
        {"id": "inst", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"id": "tool", "messages": [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "{}"},
                                    {"role": "assistant", "content": "Sunny"}]},
        {"id": "open", "messages": [{"role": "user", "content": "Unanswered"}]},
        {"id": "toolcall", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
         "messages": [{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c0", "type": "function",
                           "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                      {"role": "tool", "tool_call_id": "c0", "content": "{}"},
                      {"role": "assistant", "content": "Sunny"}]},
    ]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "chat_cuts.jsonl"
    code, printed = run("prepare_chat", [jsonl, "-o", out, "--max-skip-rate", "0.5"], capsys)
    assert code == 0 and "4 kept, 2 skipped" in printed and "invalid_messages=2" in printed
    seqs = built_tasks(tok, out)
    trained = {k: tok.decode(s.input_ids[s.labels != IGNORE_INDEX]) for k, s in seqs.items()}
    assert trained == {"think1": "Add them.\n</think>\n4<|im_end|>", "think2": "Recall.\n</think>\nParis<|im_end|>",
                       "inst": "Hello!<|im_end|>",
                       "toolcall": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                   "</tool_call><|im_end|>Sunny<|im_end|>"}
    assert all(not s.audios for s in seqs.values())
    assert tok.decode(seqs["think2"].input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")
    # forcing instruct mode on chats that carry reasoning skips them instead of dropping the reasoning
    code, printed = run("prepare_chat", [jsonl, "-o", tmp_path / "i.jsonl", "--mode", "instruct"], capsys)
    assert code == 1 and "2 kept, 4 skipped" in printed


@pytest.fixture(scope="module")
def tiny_codecs():
    script = load_script("pretokenize")
    cfg = script.load_model_config(ROOT / "conf/model/tiny.yaml")
    torch.manual_seed(0)  # the tiny codecs are randomly initialised: the script's run below seeds alike
    return script, cfg, script.build_codecs(cfg, ("tts", "tta"), "cpu")


def test_pretokenize_encodes_resumes_and_reports(tmp_path, write_audio, capsys, tiny_codecs):
    script, cfg, codecs = tiny_codecs
    from lhotse import Recording

    def rec(name, seconds):
        return Recording.from_file(write_audio(tmp_path / f"{name}.wav", seconds, 300 + 100 * seconds))

    cuts = [schema.make_tts_cut("One second.", audio=rec("s1", 1.0), cut_id="tts1"),
            schema.make_asr_cut(rec("s2", 0.5), "HI", "en", cut_id="asr1"),
            schema.make_tta_cut("Three seconds of tone.", audio=rec("a3", 3.0), cut_id="tta1"),
            schema.make_tts_cut("Gone.", audio=rec("gone", 0.5), cut_id="tts_gone"),
            schema.make_tts_cut("Already.", speech_codes=[1, 2, 3], cut_id="tts_done")]
    (tmp_path / "gone.wav").unlink()
    manifest = tmp_path / "in.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    out = tmp_path / "codes.jsonl.gz"
    argv = [manifest, "-o", out, "--model-config", ROOT / "conf/model/tiny.yaml", "--batch-size", "2",
            "--max-skip-rate", "0.5"]
    torch.manual_seed(0)
    code, printed = run("pretokenize", argv, capsys)
    assert code == 0 and "pretokenize: 2 kept, 1 skipped" in printed and "missing_audio=1" in printed
    done = {c.id: c for c in CutSet.from_file(out)}
    assert sorted(done) == ["asr1", "tta1", "tts1", "tts_done"]
    failed = [json.loads(line) for line in (tmp_path / "codes.jsonl.gz.failed.jsonl").read_text().splitlines()]
    assert failed == [{"id": "tts_gone", "reason": "missing_audio", "detail": failed[0]["detail"]}]
    speech = schema.get_speech_codes(done["tts1"], 256)
    assert speech.shape == (50,)  # 1 s at 50 Hz
    assert torch.equal(speech, codecs["tts"].encode(load_cut_audio(cuts[0])))
    audio = schema.get_audio_codes(done["tta1"], 64)
    assert audio.shape == (4, 500)  # 3 s padded to the fixed 10 s
    assert torch.equal(audio, codecs["tta"].encode(torch.nn.functional.pad(load_cut_audio(cuts[2]), (0, 112000))))
    assert schema.get_speech_codes(done["tts_done"]).tolist() == [1, 2, 3]  # copied, not re-encoded

    # interrupted run: keep three cuts and half of the fourth line, then resume
    with gzip.open(out, "rt") as f:
        lines = f.read().splitlines(keepends=True)
    assert [json.loads(line)["id"] for line in lines] == ["tts1", "asr1", "tta1", "tts_done"]
    with gzip.open(out, "wt") as f:
        f.write("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    code = script.pretokenize(manifest, out, codecs, ("tts", "tta"), batch_size=2, max_skip_rate=0.5)
    printed = capsys.readouterr().out
    assert code == 0 and "encoded 0, copied 1 cuts of other tasks or with codes, 3 already done" in printed
    assert "pretokenize: 2 kept, 1 skipped" in printed  # counted over the whole manifest
    again = {c.id: c for c in CutSet.from_file(out)}
    assert sorted(again) == sorted(done)
    assert all(again[k].to_dict() == done[k].to_dict() for k in done)

    # the pre-tokenised manifest builds with the tiny model's tokenizer (its vocabulary: 256 / 64 codes)
    tiny_tok = AudexTokenizer.build_tiny(AudexVocab(**cfg.vocab), bpe_size=512)
    builder = SequenceBuilder(tiny_tok, max_length=8192)
    tta = builder(again["tta1"])
    assert (tta.labels != IGNORE_INDEX).sum() == 2000 + 3
    assert tiny_tok.vocab.is_speech(builder(again["tts1"]).input_ids).sum() == 50


def test_pretokenize_refuses_a_codec_that_does_not_fit_the_vocab(tiny_codecs):
    script, cfg, _ = tiny_codecs
    wrong = cfg.copy()
    wrong.vocab.speech_codebook_size = 65536
    with pytest.raises(SystemExit, match="codebook of 256 codes but the vocabulary reserves 65536"):
        script.build_codecs(wrong, ("tts",), "cpu")
