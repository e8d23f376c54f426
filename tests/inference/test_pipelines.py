"""Task pipelines on the tiny model: presets from config, TTA's fixed 10 s, TTS (long form), ASR, S2S."""

from pathlib import Path

import pytest
import torch

from audex.inference.answers import extract_short_answer
from audex.inference.decoding import GenerationOutput
from audex.inference.pipelines import AudexPipeline, TextResult, split_long_text
from audex.inference.presets import load_presets, presets_from_config
from audex.prompts import s2s_reasoning_prompt

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return AudexPipeline(tiny_model)


# ---- presets ------------------------------------------------------------------------------------
def test_presets_hold_the_papers_numbers():
    p = load_presets()
    assert (p["tts"].sampling.top_k, p["tts"].sampling.temperature, p["tts"].sampling.guidance_scale) == (80, 0.1, 1.5)
    assert (p["tta"].sampling.top_k, p["tta"].sampling.temperature, p["tta"].sampling.guidance_scale) == (80, 1.0, 3.0)
    assert p["tta"].audio_seconds == 10 and p["tta"].output == "audio" and p["tts"].output == "speech"
    for task in ("asr", "asr_multilingual", "ast"):
        assert p[task].sampling.do_sample is False
    for task in ("audio_qa", "mcq", "entailment", "hallucination"):
        assert (p[task].sampling.top_p, p[task].sampling.temperature) == (0.9, 0.7)
    assert p["chat"].thinking and not p["asr"].thinking and not p["tts"].thinking
    assert (p.s2s.transcribe, p.s2s.reason, p.s2s.speak) == ("asr", "chat", "tts")


def test_presets_compose_through_hydra_and_take_overrides():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="infer", overrides=["model.path=x.nemo", "presets.tta.sampling.guidance_scale=5.0"])
    p = presets_from_config(cfg.presets)
    assert p["tta"].sampling.guidance_scale == 5.0 and p["tts"].sampling.guidance_scale == 1.5
    assert load_presets(overrides=["asr.sampling.max_new_tokens=7"])["asr"].sampling.max_new_tokens == 7


def test_bad_presets_are_rejected(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("tts:\n  output: speech\n  sampling: {top_k: 80, temprature: 0.1}\n")
    with pytest.raises(ValueError, match="preset 'tts': bad sampling keys"):
        load_presets(bad)
    with pytest.raises(KeyError, match="no inference preset 'ttx'"):
        load_presets()["ttx"]
    with pytest.raises(FileNotFoundError, match="presets file"):
        load_presets(tmp_path / "missing.yaml")


# ---- generation ---------------------------------------------------------------------------------
def test_tta_gives_exactly_2000_codes_in_layer_order_and_10_seconds(pipe, tiny_model):
    v = tiny_model.vocab
    res = pipe.tta(["Birds chirping in a forest."], seed=0)[0]
    assert res.finish_reason == "stop"
    assert res.codes.shape == (4, 500)  # 500 frames x 4 RVQ layers = 2,000 tokens
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) < v.audio_codebook_size
    assert res.waveform.shape == (160000,)  # 10 s at 16 kHz
    assert torch.isfinite(res.waveform).all()


def test_tta_budget_too_small_for_10_seconds_is_an_error(pipe):
    with pytest.raises(ValueError, match="needs 2000 codes"):
        pipe.tta(["rain"], max_new_tokens=100)


def test_tts_long_form_text_is_split_decoded_and_joined(tiny_model):
    presets = load_presets(overrides=["tts.long_form_max_chars=30"])
    pipe = AudexPipeline(tiny_model, presets)
    text = "Hello there. The birds sing in the forest today. It is a fine day."
    assert split_long_text(text, 30) == ["Hello there.", "The birds sing in the forest", "today. It is a fine day."]
    long_res, short_res = pipe.tts([text, "Hi."], max_new_tokens=12, seed=0)
    assert (long_res.num_segments, short_res.num_segments) == (3, 1)
    for res, n_seg in ((long_res, 3), (short_res, 1)):
        assert 1 <= res.codes.numel() <= 12 * n_seg  # each segment: at most max_new_tokens codes
        assert res.waveform.shape == (res.codes.numel() * 320,)
        assert int(res.codes.max()) < tiny_model.vocab.speech_codebook_size


def test_tts_unconditional_twin_has_the_same_length_and_pads(pipe, tiny_model):
    from audex.prompts import tts_user_content

    tok = tiny_model.tokenizer
    cond, uncond = pipe._generation_prompts(tts_user_content, ["Hello, how are you today?"],
                                            tiny_model.vocab.speechgen_start, False)
    assert len(cond[0]) == len(uncond[0]) and uncond[0].count(tok.pad_id) > 0
    assert cond[0][-1] == uncond[0][-1] == tiny_model.vocab.speechgen_start


# ---- understanding ------------------------------------------------------------------------------
def test_asr_with_and_without_language(pipe, tone):
    wavs = [tone(1.0), tone(0.5, freq=220.0)]
    plain = pipe.asr(wavs, max_new_tokens=6)
    assert len(plain) == 2 and all(r.fields is not None and len(r.token_ids) <= 6 for r in plain)
    forced = pipe.asr(wavs, languages=["de", "fr"], max_new_tokens=4)
    assert forced[0].text.startswith("Language: de\nTranscription:")
    assert forced[1].text.startswith("Language: fr\nTranscription:")
    with pytest.raises(ValueError, match="for every input or for none"):
        pipe.asr(wavs, languages=["de", None])


def test_thinking_and_instruct_prompts_and_answer_split(pipe, tiny_model):
    tok = tiny_model.tokenizer
    assert tok.decode(pipe.prompt_ids("Hi", thinking=True)).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(pipe.prompt_ids("Hi", thinking=False)).endswith("<|im_start|>assistant\n<think></think>\n")
    ids = tok.encode("Let me think.\n") + [tok.think_end] + tok.encode("\nThe answer is 4.")
    out = GenerationOutput(token_ids=[ids], finish_reasons=["stop"], num_steps=len(ids))
    res = pipe._text_results(out, thinking=True)[0]
    assert (res.thinking, res.text) == ("Let me think.", "The answer is 4.")
    chat = pipe.chat(["What is two plus two?"], max_new_tokens=5, seed=0)[0]
    assert len(chat.token_ids) <= 5 and chat.thinking is not None  # the preset's thinking mode


# ---- speech to speech ---------------------------------------------------------------------------
def test_boxed_answer_extraction():
    assert extract_short_answer("so \\boxed{3} ... The answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_short_answer("Thus the answer is (B).") == "(B)"
    assert extract_short_answer("The answer is \\boxed{{7}}.") == "7"  # A.8's doubled braces
    assert extract_short_answer("no idea") is None


def test_speech_to_speech_cascade_end_to_end(pipe, tone):
    res = pipe.s2s([tone(1.0)], transcribe={"max_new_tokens": 6}, reason={"max_new_tokens": 8},
                   speak={"max_new_tokens": 10, "seed": 0})[0]
    assert res.steps["asr"].fields is not None and res.transcript == res.steps["asr"].fields["transcription"]
    assert res.speech.codes.numel() >= 1 and res.speech.waveform.shape == (res.speech.codes.numel() * 320,)
    assert res.spoken_text == res.speech.text


def test_speech_to_speech_speaks_the_extracted_answer(tiny_model, tone, monkeypatch):
    pipe = AudexPipeline(tiny_model)
    asked = []

    def fake_reasoning(conversations, preset="chat", **overrides):
        asked.extend(conversations)
        return [TextResult(text="It is 42. The answer is \\boxed{42}.", token_ids=[], finish_reason="stop",
                           thinking="6 x 7")]

    monkeypatch.setattr(pipe, "chat", fake_reasoning)
    res = pipe.s2s([tone(1.0)], transcribe={"max_new_tokens": 6}, speak={"max_new_tokens": 8, "seed": 0})[0]
    assert asked == [s2s_reasoning_prompt(res.transcript)]
    assert res.answer == "42" and res.spoken_text == "The answer is 42"
    assert res.speech.waveform.numel() > 0
