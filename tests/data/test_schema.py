"""One CutSet schema for six tasks: builders, accessors, code encoding, JSONL and Shar round trips."""

import base64

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import CutSet, Recording

from audex.data import schema
from audex.data.sequence import SequenceBuilder
from audex.data.skips import INVALID_BASE64, INVALID_CODEC_CODES, MISSING_FIELD, UNKNOWN_TASK, SkipSample
from audex.tokenizer import AudexTokenizer
from audex.vocab import AudexVocab

SHAR_ADDED = {"shard_origin", "shar_epoch"}  # lhotse's own bookkeeping fields


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny(AudexVocab(), bpe_size=512)


@pytest.fixture
def all_kinds(tmp_path, tone):
    def rec(name, seconds, freq):
        sf.write(tmp_path / f"{name}.flac", tone(seconds, freq).numpy(), 16000)
        return Recording.from_file(tmp_path / f"{name}.flac")

    g = torch.Generator().manual_seed(0)
    speech = torch.randint(0, 65536, (75,), generator=g)
    audio = torch.randint(0, 1024, (4, 500), generator=g)
    return [
        schema.make_asr_cut(rec("a", 1.0, 300), "HELLO WORLD", "en", cut_id="asr1"),
        schema.make_asr_cut(rec("b", 0.5, 500), "bonjour", "fr", cut_id="asr2", language_in_prompt=True),
        schema.make_ast_cut(rec("c", 0.7, 700), "Guten Morgen", "de", "Good morning", cut_id="ast1"),
        schema.make_audio_qa_cut(rec("d", 0.6, 900), "What do you hear?", "A tone.", cut_id="qa1"),
        schema.make_tts_cut("Hello there.", speech_codes=speech, language="en", cut_id="tts1"),
        schema.make_tts_cut("With audio.", audio=rec("e", 0.4, 400), speech_codes=speech[:20], cut_id="tts2"),
        schema.make_tta_cut("Birds chirping.", audio_codes=audio, cut_id="tta1"),
        schema.make_text_cut("chat1", [{"role": "user", "content": "2+2?"},
                                       {"role": "assistant", "content": "4", "thinking": "add"}], thinking=True),
    ]


def test_codes_are_little_endian_int32_base64():
    assert schema.encode_codes([1, 256]) == base64.b64encode(b"\x01\x00\x00\x00\x00\x01\x00\x00").decode()
    # audio codes [n_q, T] are stored frame-major: t0q0 t0q1 t1q0 t1q1
    stored = schema.encode_audio_codes(np.array([[1, 2], [3, 4]]))
    assert schema.decode_codes(stored).tolist() == [1, 3, 2, 4]
    cut = schema.make_tta_cut("x", audio_codes=np.array([[1, 2], [3, 4]]), cut_id="t")
    assert cut.custom["audio_codes_n_q"] == 2 and schema.get_audio_codes(cut).tolist() == [[1, 2], [3, 4]]
    assert cut.duration == pytest.approx(2 / 50)


def test_each_kind_has_its_fields(all_kinds):
    by_id = {c.id: c for c in all_kinds}
    assert [schema.get_task(c) for c in all_kinds] == ["asr", "asr", "ast", "audio_qa", "tts", "tts", "tta", "text"]
    assert schema.get_transcript(by_id["asr1"]) == "HELLO WORLD" and schema.get_language(by_id["asr1"]) == "en"
    assert schema.language_in_prompt(by_id["asr2"]) and not schema.language_in_prompt(by_id["asr1"])
    assert schema.get_translation(by_id["ast1"]) == "Good morning"
    assert (schema.get_question(by_id["qa1"]), schema.get_answer(by_id["qa1"])) == ("What do you hear?", "A tone.")
    assert schema.get_caption(by_id["tta1"]) == "Birds chirping."
    assert schema.get_speech_codes(by_id["tts1"], 65536).shape == (75,)
    assert by_id["tts1"].duration == pytest.approx(1.5) and not by_id["tts1"].has_recording
    chat = by_id["chat1"]
    assert not chat.has_recording and chat.duration == 0 and schema.is_thinking(chat)
    assert schema.get_messages(chat)[1] == {"role": "assistant", "content": "4", "thinking": "add"}
    assert by_id["tts2"].has_recording and by_id["tts2"].duration == pytest.approx(0.4)
    assert schema.has_codes(by_id["tts2"])
    assert not schema.has_codes(schema.make_tts_cut("Not yet encoded.", audio=by_id["tts2"].recording, cut_id="t3"))


def _comparable(cut):
    d = cut.to_dict()
    d["custom"] = {k: v for k, v in (d.get("custom") or {}).items() if k not in SHAR_ADDED}
    d.pop("recording", None)
    return d


def test_jsonl_round_trip(all_kinds, tmp_path):
    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(all_kinds).to_file(path)
    back = list(CutSet.from_file(path))
    assert [c.to_dict() for c in back] == [c.to_dict() for c in all_kinds]


def test_shar_round_trip_builds_the_same_sequences(all_kinds, tmp_path, tok):
    shar = tmp_path / "shar"
    shar.mkdir()
    CutSet.from_cuts(all_kinds).to_shar(shar, fields={"recording": "flac"}, shard_size=3)
    back = list(CutSet.from_shar(in_dir=shar))
    assert [c.id for c in back] == [c.id for c in all_kinds]
    builder = SequenceBuilder(tok, max_length=8192)
    for orig, new in zip(all_kinds, back):
        assert _comparable(new) == _comparable(orig)
        assert new.has_recording == orig.has_recording
        a, b = builder(orig), builder(new)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        for wa, wb in zip(a.audios, b.audios):  # FLAC in the tar: 16-bit, equal to the source file
            assert torch.allclose(wa, wb, atol=1e-4)


def test_missing_fields_are_skips_naming_the_field(all_kinds):
    qa = all_kinds[3]
    del qa.custom["answer"]
    with pytest.raises(SkipSample, match=r"custom\['answer'\] is missing") as e:
        schema.get_answer(qa)
    assert e.value.reason == MISSING_FIELD and e.value.cut_id == "qa1"
    tts = schema.make_tts_cut("Not yet encoded.", audio=all_kinds[5].recording, cut_id="t3")
    with pytest.raises(SkipSample, match="speech_codes") as e:
        schema.get_speech_codes(tts)
    assert e.value.reason == MISSING_FIELD
    tts.custom["task"] = "speech"
    with pytest.raises(SkipSample) as e:
        schema.get_task(tts)
    assert e.value.reason == UNKNOWN_TASK and "known tasks" in str(e.value)


def test_bad_codes():
    cut = schema.make_tts_cut("x", speech_codes=[1, 2], cut_id="t")
    cut.custom["speech_codes"] = "%%%"
    with pytest.raises(SkipSample) as e:
        schema.get_speech_codes(cut)
    assert e.value.reason == INVALID_BASE64
    cut.custom["speech_codes"] = base64.b64encode(b"\x01\x02\x03").decode()  # 3 bytes: not int32s
    with pytest.raises(SkipSample) as e:
        schema.get_speech_codes(cut)
    assert e.value.reason == INVALID_CODEC_CODES


def test_builders_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="transcript must be a non-empty string"):
        schema.make_tts_cut("  ", speech_codes=[1], cut_id="t")
    with pytest.raises(ValueError, match="needs the speech audio or"):
        schema.make_tts_cut("hi", cut_id="t")
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        schema.make_text_cut("c", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="system turn must come first"):
        schema.make_text_cut("c", [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                   {"role": "assistant", "content": "c"}])
    with pytest.raises(ValueError, match="instruct mode"):
        schema.make_text_cut("c", [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "b", "thinking": "r"}], thinking=False)
    with pytest.raises(ValueError, match="role in"):
        schema.make_text_cut("c", [{"role": "function", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="tool response must follow"):  # "tool" is a role of tool-calling chats
        schema.make_text_cut("c", [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}])
