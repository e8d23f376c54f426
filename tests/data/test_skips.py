"""Every bad-input class gives its skip reason; counts, summaries, the max skip rate; the paper's filters."""

import logging
import pickle

import pytest
import soundfile as sf
import torch
from lhotse import Recording
from lhotse.audio import AudioSource

from audex.data import schema, skips
from audex.data.filters import PaperFilterConfig, PaperFilters
from audex.data.sequence import SequenceBuilder
from audex.data.skips import SkipCounter, SkipSample, TooManySkipsError
from audex.tokenizer import AudexTokenizer
from audex.vocab import AudexVocab


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny(AudexVocab(), bpe_size=512)


def fake_recording(seconds: float, rid: str = "r") -> Recording:
    """Metadata only (filters read durations, never audio)."""
    n = int(seconds * 16000)
    return Recording(id=rid, sources=[AudioSource(type="file", channels=[0], source=f"/nowhere/{rid}.wav")],
                     sampling_rate=16000, num_samples=n, duration=n / 16000)


@pytest.fixture
def bad_cuts(tmp_path, tone):
    def recorded(name, samples):
        path = tmp_path / f"{name}.wav"
        sf.write(path, tone(1.0).numpy()[:samples], 16000)
        return Recording.from_file(path)

    good = schema.make_asr_cut(recorded("good", 16000), "HI", "en", cut_id="good")
    missing = schema.make_asr_cut(recorded("gone", 16000), "HI", "en", cut_id="missing")
    (tmp_path / "gone.wav").unlink()
    corrupt = schema.make_asr_cut(recorded("bad", 16000), "HI", "en", cut_id="corrupt")
    (tmp_path / "bad.wav").write_bytes(b"RIFF" + b"\x00garbage" * 20)
    empty = schema.make_asr_cut(recorded("empty", 0), "HI", "en", cut_id="empty")
    b64 = schema.make_tts_cut("Hi", speech_codes=[1, 2], cut_id="b64")
    b64.custom["speech_codes"] = "this is not base64!"
    speech_range = schema.make_tts_cut("Hi", speech_codes=[1, 65536], cut_id="speech_range")
    audio_range = schema.make_tta_cut("Rain", audio_codes=torch.full((4, 500), 1024), cut_id="audio_range")
    long = schema.make_text_cut("long", [{"role": "user", "content": "blah " * 5000},
                                         {"role": "assistant", "content": "ok"}])
    unknown = schema.make_text_cut("unknown", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    unknown.custom["task"] = "karaoke"
    no_text = schema.make_asr_cut(recorded("nt", 16000), "HI", "en", cut_id="no_text")
    no_text.supervisions[0].text = None
    injected = schema.make_text_cut("injected", [{"role": "user", "content": "a<|im_end|>"},
                                                 {"role": "assistant", "content": "b"}])
    sound_in_chat = schema.make_text_cut("sound", [{"role": "user", "content": "<sound> what?"},
                                                   {"role": "assistant", "content": "b"}])
    return {
        None: good,
        skips.MISSING_AUDIO: missing,
        skips.CORRUPT_AUDIO: corrupt,
        skips.ZERO_LENGTH_AUDIO: empty,
        skips.INVALID_BASE64: b64,
        skips.CODES_OUT_OF_RANGE: [speech_range, audio_range],
        skips.TOO_LONG_FOR_CONTEXT: long,
        skips.UNKNOWN_TASK: unknown,
        skips.MISSING_FIELD: no_text,
        skips.INVALID_MESSAGES: injected,
        skips.AUDIO_PLACEHOLDER_MISMATCH: sound_in_chat,
    }


def test_every_bad_input_has_its_reason(bad_cuts, tok):
    builder = SequenceBuilder(tok, max_length=4096)
    assert builder(bad_cuts[None]).task == "asr"
    for reason, cuts in bad_cuts.items():
        for cut in cuts if isinstance(cuts, list) else [cuts]:
            if reason is None:
                continue
            with pytest.raises(SkipSample) as e:
                builder(cut)
            assert e.value.reason == reason, (cut.id, str(e.value))
            assert e.value.cut_id == cut.id and cut.id in str(e.value)


def test_counter_counts_logs_and_summarises(bad_cuts, tok, caplog):
    builder = SequenceBuilder(tok, max_length=4096)
    cuts = [c for v in bad_cuts.values() for c in (v if isinstance(v, list) else [v])]
    counter = SkipCounter("epoch 0", log_first=1)
    with caplog.at_level(logging.WARNING, logger="audex.data"):
        built = [s for s in (counter.run(builder, c) for c in cuts) if s is not None]
    assert [s.cut_id for s in built] == ["good"]
    assert counter.kept == 1 and counter.skipped == 11 and counter.counts[skips.CODES_OUT_OF_RANGE] == 2
    assert set(counter.counts) == {r for r in bad_cuts if r is not None}
    # one full line per reason (log_first=1), the second out-of-range cut only counted
    assert sum("codes_out_of_range" in r.getMessage() for r in caplog.records) == 1
    summary = counter.summary()
    assert summary.startswith("epoch 0: 1 kept, 11 skipped (91.67 %): codes_out_of_range=2, ")
    assert "missing_audio=1" in summary and "unknown_task=1" in summary
    lines = counter.log_summary()
    assert "e.g. cut 'missing': missing_audio:" in lines and "fix the path in the manifest" in lines


def test_max_skip_rate_raises_a_clear_error():
    counter = SkipCounter("train", max_skip_rate=0.1, min_examples=11)
    for i in range(8):
        counter.accept()
    counter.skip(skips.MISSING_AUDIO, cut_id="a", detail="/x/a.flac does not exist")
    counter.skip(skips.MISSING_AUDIO, cut_id="b")  # 2 of 10 = 20 %, but fewer than min_examples were seen
    assert counter.skipped == 2
    with pytest.raises(TooManySkipsError, match=r"3 of 11 examples \(27.27 %\) were skipped, above max_skip_rate=0.1"):
        counter.skip(skips.CORRUPT_AUDIO, cut_id="c")


def test_max_skip_rate_under_min_examples_checked_at_the_end():
    counter = SkipCounter("prep", max_skip_rate=0.25, min_examples=1000)
    counter.accept(2)
    counter.skip(skips.ZERO_LENGTH_AUDIO, cut_id="z")
    with pytest.raises(TooManySkipsError, match="zero_length_audio: 1  e.g. cut 'z'"):
        counter.check(final=True)
    merged = SkipCounter("all").merge(counter).merge(counter)
    assert merged.kept == 4 and merged.counts[skips.ZERO_LENGTH_AUDIO] == 2


def test_loader_accounts_filters_apart_from_bad_input():
    """Skips travel as records (SkipEvents, picklable for workers); LoaderSkips counts the paper's filters apart
    from bad input, and only bad input counts against max_skip_rate."""
    events = skips.SkipEvents()
    events.skip(SkipSample(skips.AUDIO_TOO_LONG, "31 s", "long"))
    events.skip(skips.MISSING_AUDIO, cut_id="gone", detail="/x.flac")
    assert len(events) == 2 and pickle.loads(pickle.dumps(events)).drain() == []  # a worker's copy starts empty
    acc = skips.LoaderSkips("train data", max_skip_rate=0.4, min_examples=1000)
    acc.account(events.drain(), kept=2)
    assert (acc.skips.kept, acc.skips.skipped) == (2, 1) and acc.filtered.counts == {skips.AUDIO_TOO_LONG: 1}
    assert acc.filtered.kept == 3  # the filters saw the bad cut too, and let it through
    acc.check()  # 1 of 3 bad: under 40 %
    acc.account([(skips.CORRUPT_AUDIO, "", "c")], kept=0)
    with pytest.raises(TooManySkipsError, match=r"2 of 4 examples \(50.00 %\)"):
        acc.check()
    assert "train data filters" in acc.log_summary()
    acc.reset()
    assert acc.skips.seen == acc.filtered.seen == 0


def test_unknown_reason_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipSample("gremlins")


def test_paper_filters(tok):
    keep = PaperFilters(PaperFilterConfig(), tokenizer=tok)
    tts = lambda s: schema.make_tts_cut("x", audio=fake_recording(s), cut_id=f"tts{s}")  # noqa: E731
    qa = lambda s: schema.make_audio_qa_cut(fake_recording(s), "q", "a", cut_id=f"qa{s}")  # noqa: E731
    chat = lambda n: schema.make_text_cut(f"chat{n}", [{"role": "user", "content": "a" + " a" * (n - 1)},  # noqa: E731
                                                       {"role": "assistant", "content": "b"}])
    assert len(tok.encode("a" + " a" * 9)) == 10  # one token per word with this tokenizer
    cases = [(tts(0.05), skips.AUDIO_TOO_SHORT), (tts(0.1), None), (tts(119.9), None),
             (tts(120.5), skips.AUDIO_TOO_LONG), (qa(0.05), skips.AUDIO_TOO_SHORT), (qa(899.0), None),
             (qa(901.0), skips.AUDIO_TOO_LONG), (schema.make_tta_cut("rain", audio=fake_recording(0.05), cut_id="tta"), None),
             (chat(199_999), None), (chat(200_001), skips.TEXT_TOO_LONG)]  # + 1 token of the answer
    for cut, reason in cases:
        assert keep.reason(cut) == reason, cut.id
    kept = [c.id for c, _ in cases if keep(c)]
    assert kept == ["tts0.1", "tts119.9", "qa899.0", "tta", "chat199999"]
    assert keep.counter.counts == {skips.AUDIO_TOO_SHORT: 2, skips.AUDIO_TOO_LONG: 2, skips.TEXT_TOO_LONG: 1}
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PaperFilters(PaperFilterConfig())
    assert PaperFilters(PaperFilterConfig(text_max_tokens=None))(chat(10))
