"""Voice-prompted TTS and tool chats through the serving request schema and the local engine: the same answers as
the pipeline, the prompt (voice codes, tool system turn) counted in the context budget, mixed batches answered in
order, and named refusals where the task or the server's LLM path cannot take them."""

import json

import pytest
import torch
from test_tool_calls import HERMES_TEMPLATE, WEATHER

from audex.inference.pipelines import AudexPipeline, generation_prompts
from audex.serving.local_engine import LocalEngine
from audex.serving.requests import BadRequest, RequestValidator, ServeLimits, ServeRequest
from audex.tool_calls import load_tools
from audex.voice_prompt import prompted_tts_content, voice_prefix_ids

VOICE_TEXT = "he hoped there would be stew"


@pytest.fixture(scope="module")
def engine(tiny_model):
    tiny_model.tokenizer.hf.chat_template = HERMES_TEMPLATE      # a backbone that ships a tool template
    yield LocalEngine(tiny_model, ServeLimits(max_new_tokens=6, max_speech_seconds=0.3, max_voice_seconds=1.0))
    tiny_model.tokenizer.hf.chat_template = None


def _voice(seconds: float) -> torch.Tensor:
    t = torch.arange(int(seconds * 16000)) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 330 * t)


def test_voice_prompted_tts_equals_the_pipeline(engine):
    voice = _voice(0.4)
    [res] = engine.run([ServeRequest(task="tts", text="good evening", voice=voice, voice_text=VOICE_TEXT, seed=4)])
    assert res.error is None
    [direct] = AudexPipeline(engine.model, presets=engine.pipeline.presets).tts(
        ["good evening"], voice=voice, voice_text=VOICE_TEXT, seed=4, max_new_tokens=int(0.3 * 50) + 2)
    torch.testing.assert_close(res.audio, direct.waveform.float())


def test_voice_codes_count_in_the_prompt_budget(engine):
    v, voice = engine.validator, _voice(0.4)
    prompted = v.prompt_length("tts", "good evening", None, v.extras(
        ServeRequest(task="tts", text="good evening", voice=voice, voice_text=VOICE_TEXT)))
    codes = engine.model.speech_codec.encode(voice)
    assert codes.numel() == 20                                       # 0.4 s at 50 X-Codec2 codes per second
    pipe = engine.pipeline
    cond, _ = generation_prompts(pipe.tokenizer, pipe.prompt_ids, prompted_tts_content(VOICE_TEXT), ["good evening"],
                                 voice_prefix_ids(pipe.vocab, codes), pipe.presets["tts"].thinking)
    assert prompted == len(cond[0]) > v.prompt_length("tts", "good evening", None) + 20


def test_tool_chat_returns_the_pipelines_parsed_calls(engine):
    [res] = engine.run([ServeRequest(task="chat", text="Weather in Paris?", tools=[WEATHER], seed=1)])
    [direct] = AudexPipeline(engine.model, presets=engine.pipeline.presets).chat(
        ["Weather in Paris?"], tools=[WEATHER], seed=1, max_new_tokens=6)
    assert res.error is None and res.text == direct.text
    assert res.tool_calls == direct.tool_calls and isinstance(res.tool_calls, list)
    # the tools sit in the system turn: the prompt is the template's, longer than the plain chat's
    v = engine.validator
    assert v.prompt_length("chat", "Weather in Paris?", None, {"tools": [WEATHER]}) > \
        v.prompt_length("chat", "Weather in Paris?", None) + len(json.dumps(WEATHER)) // 8


def test_mixed_batch_is_answered_in_order(engine):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    reqs = [ServeRequest(task="chat", text="Hi", seed=2),
            ServeRequest(task="chat", text="Weather in Paris?", tools=[WEATHER], seed=2),
            ServeRequest(task="chat", text="What time is it?", tools=[other], seed=2),
            ServeRequest(task="tts", text="good evening", seed=2),
            ServeRequest(task="tts", text="good evening", voice=_voice(0.2), voice_text=VOICE_TEXT, seed=2)]
    together = engine.run(reqs)
    alone = [engine.run([r])[0] for r in reqs]
    for a, b in zip(together, alone):
        assert a.error is None and a.text == b.text and a.tool_calls == b.tool_calls
        torch.testing.assert_close(a.audio, b.audio)
    assert together[0].tool_calls is None and together[1].tool_calls is not None


@pytest.mark.parametrize("req, expected", [
    (ServeRequest(task="tts", text="hi", tools=[WEATHER]), "'tools' is an input of task 'chat' only"),
    (ServeRequest(task="chat", text="hi", tools=[{"type": "function"}]), "'tools'[0] must be"),
    (ServeRequest(task="chat", text="hi", tools=[]), "'tools' must be a non-empty list"),
    (ServeRequest(task="chat", text="hi", voice=_voice(0.2), voice_text="x"), "inputs of task 'tts' only"),
    (ServeRequest(task="tts", text="hi", voice=_voice(0.2)), "needs a non-empty 'voice_text'"),
    (ServeRequest(task="tts", text="hi", voice_text="x"), "needs an 'voice' input"),
    (ServeRequest(task="tts", text="hi", voice=_voice(1.5), voice_text="x"), "'voice' is 1.5 s long"),
    (ServeRequest(task="tts", text="hi", voice=torch.full((800,), float("nan")), voice_text="x"), "'voice'"),
])
def test_bad_voice_and_tool_requests_are_refused_by_name(engine, req, expected):
    with pytest.raises(BadRequest) as err:
        engine.validator.validate(req)
    assert expected in str(err.value)
    [res] = engine.run([req])
    assert res.error is not None and expected in res.error


def test_a_server_without_voice_or_tool_support_refuses_them(engine):
    e = engine
    bare = RequestValidator(e.tokenizer, e.pipeline.prompt_ids, e.pipeline.presets, e.limits, e.context,
                            e.model.frames_for_samples, e.pipeline.formatter.audio_content)
    with pytest.raises(BadRequest, match="does not take 'tools'"):
        bare.validate(ServeRequest(task="chat", text="hi", tools=[WEATHER]))
    with pytest.raises(BadRequest, match="does not encode voice prompts"):
        bare.validate(ServeRequest(task="tts", text="hi", voice=_voice(0.2), voice_text="x"))


def test_load_tools_from_a_json_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([WEATHER]))
    assert load_tools(str(path)) == [WEATHER]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_tools(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_tools(str(tmp_path / "missing.json"))
