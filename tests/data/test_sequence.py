"""Sequence builder: <sound> expansion (750 frames per 30 s), codec answers, label masks, and the model contract."""

import numpy as np
import pytest
import soundfile as sf
import torch
from lhotse import Recording

from audex.data import schema
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder
from audex.data.skips import INVALID_CODEC_CODES, TOO_LONG_FOR_CONTEXT, SkipSample
from audex.modules.audio_encoder import WindowedFrames, encoder_frames, frames_per_window
from audex.prompts import SoundPlaceholderError, asr_target, expand_sound
from audex.tokenizer import AudexTokenizer
from audex.vocab import AudexVocab


@pytest.fixture(scope="module")
def tok():
    return AudexTokenizer.build_tiny(AudexVocab(), bpe_size=512)


@pytest.fixture(scope="module")
def builder(tok):
    return SequenceBuilder(tok, max_length=8192)


@pytest.fixture
def wav_file(tmp_path, tone):
    def make(seconds, sr=16000, channels=1, name="a"):
        x = tone(seconds, sr=sr).numpy()
        if channels > 1:
            x = np.stack([x, 0.5 * x], axis=1)
        path = tmp_path / f"{name}.flac"
        sf.write(path, x, sr)
        return Recording.from_file(path)
    return make


def trained_text(tok, seq):
    return tok.decode(seq.input_ids[seq.labels != IGNORE_INDEX])


def test_windowed_frames_paper_numbers():
    f = WindowedFrames()
    assert f(1) == 750 and f(30 * 16000) == 750 and f(30 * 16000 + 1) == 1500 and f(16000 * 90) == 2250
    with pytest.raises(ValueError, match="at least one sample"):
        f(0)
    # the one formula: the encoder, the data pipeline and the Triton LLM step all call encoder_frames
    assert frames_per_window(30.0) == 750 and frames_per_window(10.0) == 250
    assert encoder_frames(16000 * 31) == 1500 == f(16000 * 31)
    with pytest.raises(ValueError, match="multiple of 0.04 s"):
        frames_per_window(0.05)


def test_sound_expander_is_shared_and_strict(tok):
    """audex.prompts.expand_sound (used by the data pipeline, the pipelines and serving): <sound> ->
    <so_start> + N x <so_embedding> + <so_end>, never trainable; a count mismatch or placeholder text is refused."""
    ids = tok.encode("<sound>\nDescribe the audio<sound>")
    out, trainable = expand_sound(ids, [750, 3], tok)
    assert out.count(tok.so_embedding) == 753 and out.count(tok.so_start) == out.count(tok.so_end) == 2
    assert len(trainable) == len(out) and not any(trainable)
    with pytest.raises(SoundPlaceholderError, match="2 <sound> tokens for 1 audios"):
        expand_sound(ids, [750], tok)
    with pytest.raises(SoundPlaceholderError, match="trainable"):
        expand_sound(ids, [1, 1], tok, trainable=[True] * len(ids))
    with pytest.raises(SoundPlaceholderError, match="so_start"):
        expand_sound(tok.encode("<so_start>"), [], tok)


def test_asr_sound_expansion_and_mask(builder, tok, wav_file):
    cut = schema.make_asr_cut(wav_file(1.0), "HELLO WORLD", "en", cut_id="u1")
    seq = builder(cut)
    ids = seq.input_ids.tolist()
    assert seq.task == "asr" and seq.cut_id == "u1" and seq.num_audio_frames == [750]
    assert len(seq.audios) == 1 and seq.audios[0].shape == (16000,)
    start = ids.index(tok.so_start)
    assert ids[start + 1: start + 751] == [tok.so_embedding] * 750 and ids[start + 751] == tok.so_end
    assert tok.sound not in ids and ids.count(tok.so_embedding) == 750
    # labels: unshifted copy of input_ids on the answer only; the audio block is never trained
    trained = seq.labels != IGNORE_INDEX
    assert torch.equal(seq.labels[trained], seq.input_ids[trained])
    assert trained_text(tok, seq) == asr_target("en", "HELLO WORLD") + "<|im_end|>"
    assert not trained[start: start + 752].any()
    text = tok.decode(seq.input_ids)
    assert "<|im_start|>user\n<so_start><so_embedding>" in text
    assert "<so_end>\nTranscribe the speech in the input audio<|im_end|>" in text
    assert builder.count_tokens(cut) == len(seq)  # from the manifest alone


def test_31_seconds_is_two_windows(builder, wav_file):
    seq = builder(schema.make_audio_qa_cut(wav_file(31.0), "What is it?", "A tone.", cut_id="q"))
    assert seq.num_audio_frames == [1500]
    assert seq.audios[0].numel() == 31 * 16000


def test_resamples_and_downmixes_to_16k_mono(builder, wav_file):
    seq = builder(schema.make_asr_cut(wav_file(1.0, sr=22050, channels=2), "HI", "en", cut_id="r"))
    assert seq.audios[0].shape == (16000,)
    # the 2nd channel is half the first: the downmix is 0.75 x the tone
    assert seq.audios[0].abs().max() == pytest.approx(0.75 * 0.3, rel=0.02)


def test_multilingual_asr_and_ast_targets(builder, tok, wav_file):
    rec = wav_file(0.5)
    asr = builder(schema.make_asr_cut(rec, "bonjour", "fr", cut_id="a", language_in_prompt=True))
    assert "Transcribe the speech in the input audio\nLanguage: fr<|im_end|>" in tok.decode(asr.input_ids)
    ast = builder(schema.make_ast_cut(rec, "Guten Morgen", "de", "Good morning", cut_id="b"))
    assert trained_text(tok, ast) == "Language: de\nTranscription: Guten Morgen\nTranslation: Good morning<|im_end|>"
    assert "Translate the spoken content in the audio to English<|im_end|>" in tok.decode(ast.input_ids)


def test_tts_answer_is_speech_codec_ids(builder, tok):
    codes = torch.tensor([0, 5, 65535, 42])
    seq = builder(schema.make_tts_cut("Hi there.", speech_codes=codes, cut_id="t"))
    v = tok.vocab
    answer = seq.labels[seq.labels != IGNORE_INDEX].tolist()
    assert answer == [v.speechgen_start, *(131072 + codes).tolist(), v.speechgen_end, tok.im_end]
    assert seq.audios == [] and seq.num_audio_frames == []


def test_tta_is_fixed_to_500_frames(builder, tok):
    v = tok.vocab
    codes = torch.randint(0, 1024, (4, 640), generator=torch.Generator().manual_seed(1))
    seq = builder(schema.make_tta_cut("Rain on a roof.", audio_codes=codes, cut_id="t"))
    answer = seq.labels[seq.labels != IGNORE_INDEX].tolist()
    assert len(answer) == 2000 + 3  # 10 s x 50 Hz x 4 layers + start, end, <|im_end|>
    assert answer[1:-2] == v.audio_codes_to_ids(codes[:, :500]).tolist()  # cropped to the first 10 s
    assert answer[0] == v.audiogen_start and answer[-2] == v.audiogen_end
    with pytest.raises(SkipSample) as e:
        builder(schema.make_tta_cut("Short.", audio_codes=codes[:, :499], cut_id="s"))
    assert e.value.reason == INVALID_CODEC_CODES and "499 frames, need 500" in str(e.value)


def test_text_chat_thinking(builder, tok):
    cut = schema.make_text_cut("c", [{"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4", "thinking": "Two plus two."}],
                               thinking=True)
    seq = builder(cut)
    assert trained_text(tok, seq) == "Two plus two.\n</think>\n4<|im_end|>"
    assert seq.audios == []


def test_too_long_for_context(tok):
    cut = schema.make_text_cut("c", [{"role": "user", "content": "word " * 300},
                                     {"role": "assistant", "content": "ok"}])
    n = SequenceBuilder(tok).count_tokens(cut)
    with pytest.raises(SkipSample) as e:
        SequenceBuilder(tok, max_length=n - 1)(cut)
    assert e.value.reason == TOO_LONG_FOR_CONTEXT and f"{n} tokens > max_length {n - 1}" in str(e.value)
    assert len(SequenceBuilder(tok, max_length=n)(cut)) == n


def test_with_the_tiny_model(tiny_model, wav_file):
    """The builder's placeholders are what AudexModel.embed_inputs expects (one row per <so_embedding>)."""
    model = tiny_model
    frames = WindowedFrames.from_model(model)
    for n in (1, 160000, 160001, 16000 * 31):
        assert frames(n) == model.frames_for_samples(n)
    builder = SequenceBuilder(model.tokenizer, frames, max_length=8192)
    seq = builder(schema.make_audio_qa_cut(wav_file(1.5), "What is it?", "A tone.", cut_id="q"))
    assert seq.num_audio_frames == [model.frames_for_samples(24000)]
    with torch.no_grad():
        embeds = model.encode_audio(seq.audios)
        assert [e.shape[0] for e in embeds] == seq.num_audio_frames
        inputs = model.embed_inputs(seq.input_ids[None], embeds)
        out = model(input_ids=seq.input_ids[None], audio_embeds=embeds)
    assert inputs.shape[:2] == (1, len(seq)) and out.logits.shape == (1, len(seq), model.vocab.size)
