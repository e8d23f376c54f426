"""Tool-calling chats: rendered exactly as the tokenizer's own chat template renders them, only assistant turns
trained, the built-in template equal to Figure 2 on plain chats, the manifest field, and pipe.chat(tools=...)."""

import pytest
import torch

from audex.data import schema
from audex.data.sequence import IGNORE_INDEX, SequenceBuilder
from audex.data.skips import INVALID_MESSAGES, SkipSample
from audex.inference.decoding import GenerationOutput
from audex.inference.pipelines import AudexPipeline
from audex.prompts import SYSTEM_PROMPT, AudexPromptFormatter
from audex.tokenizer import AudexTokenizer
from audex.tool_calls import (
    AUDEX_TOOL_CHAT_TEMPLATE,
    TOOLS_SYSTEM_PROMPT,
    parse_tool_response,
    render_chat,
    tool_chat_messages,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
CHAT = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "tool", "content": '{"temp_c": 19}'},
        {"role": "assistant", "content": "It is 21 degrees today, 19 tomorrow."}]

# A Hermes/Qwen2.5-style tool template, as a backbone tokenizer ships it (a "\n" after every <|im_end|>, no
# <think>, tool responses grouped into one user turn).
HERMES_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a bot.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call functions.\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture
def hermes_tok():
    tok = AudexTokenizer.build_tiny()
    tok.hf.chat_template = HERMES_TEMPLATE
    return tok


def _trained_text(tok, ids, trainable):
    runs, cur = [], []
    for i, t in zip(ids, trainable):
        if t:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_rendering_identical_to_the_tokenizers_own_chat_template(hermes_tok):
    fmt = AudexPromptFormatter(hermes_tok)
    assert fmt.tool_chat_template() is None  # transformers renders with the tokenizer's own template
    messages = [{"role": "system", "content": TOOLS_SYSTEM_PROMPT}] + CHAT
    expected = hermes_tok.hf.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
    assert fmt.render_text(CHAT, tools=[WEATHER]) == expected
    assert "<tools>\n" + '{"type": "function", "function": {"name": "get_weather"' in expected
    enc = fmt.encode_dialog(CHAT, tools=[WEATHER])
    ref_ids = hermes_tok.hf.apply_chat_template(messages, tools=[WEATHER], tokenize=True, return_dict=True)["input_ids"]
    assert enc["input_ids"].tolist() == list(ref_ids)
    # only the two assistant turns train: the tool call and the answer, each up to its <|im_end|>
    assert _trained_text(hermes_tok, enc["input_ids"].tolist(), enc["mask"].tolist()) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call><|im_end|>',
        "It is 21 degrees today, 19 tomorrow.<|im_end|>"]
    # the generation prompt after the tool responses is the template's too
    prompt = messages[:-1]
    assert fmt.render_text(CHAT[:-1], tools=[WEATHER]) == hermes_tok.hf.apply_chat_template(
        prompt, tools=[WEATHER], tokenize=False, add_generation_prompt=True)


def test_builtin_template_equals_figure_2_on_plain_chats():
    tok = AudexTokenizer.build_tiny()
    assert not tok.hf.chat_template
    fmt = AudexPromptFormatter(tok)
    assert fmt.tool_chat_template() == AUDEX_TOOL_CHAT_TEMPLATE  # no template of its own: the built-in one
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Yes.", "thinking": "sure"}]
    for thinking in (False, True):
        turns = [dict(t) for t in plain]
        if not thinking:
            turns[-1].pop("thinking")
        for dialog in (turns, turns[:3]):
            messages = tool_chat_messages([{"role": "system", "content": SYSTEM_PROMPT}] + dialog, thinking, None)
            text = render_chat(tok.hf, messages, None, dialog[-1]["role"] != "assistant", thinking,
                               AUDEX_TOOL_CHAT_TEMPLATE)
            assert text == fmt.render_text(dialog, thinking)
            # and the trained tokens agree with the Figure 2 path
            a = fmt.encode_pieces(fmt.tool_chat_pieces([{"role": "system", "content": SYSTEM_PROMPT}] + dialog,
                                                       thinking))
            b = fmt.encode_pieces(fmt.pieces(dialog, thinking))
            assert a == b


def test_builtin_tool_chat_rendering():
    tok = AudexTokenizer.build_tiny()
    fmt = AudexPromptFormatter(tok)
    text = fmt.render_text(CHAT, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\nYou are a helpful and harmless assistant.\n\n# Tools\n")
    assert "You are not allowed to use any tools" not in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response>\n<tool_response>\n"
        "{\"temp_c\": 19}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think></think>\nIt is 21 degrees today, 19 tomorrow.<|im_end|>")
    enc = fmt.encode_dialog(CHAT, tools=[WEATHER])
    assert enc["input_ids"].tolist() == tok.encode(text)
    assert len(_trained_text(tok, enc["input_ids"].tolist(), enc["mask"].tolist())) == 2


def test_thinking_tool_chat_keeps_reasoning_after_the_last_user_turn_only():
    tok = AudexTokenizer.build_tiny()
    fmt = AudexPromptFormatter(tok)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "thinking": "greet"},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL], "thinking": "use the tool"},
            {"role": "tool", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "21 degrees.", "thinking": "read it"}]
    enc = fmt.encode_dialog(chat, thinking=True, tools=[WEATHER])
    trained = _trained_text(tok, enc["input_ids"].tolist(), enc["mask"].tolist())
    assert trained == ['use the tool\n</think>\n<tool_call>\n{"name": "get_weather", "arguments": '
                       '{"city": "Paris", "days": 2}}\n</tool_call><|im_end|>', "read it\n</think>\n21 degrees.<|im_end|>"]
    assert "greet" not in fmt.render_text(chat, thinking=True, tools=[WEATHER])  # dropped before the last user turn


def test_tool_chat_cut_through_the_sequence_builder(hermes_tok):
    cut = schema.make_text_cut("tool-1", CHAT, tools=[WEATHER])
    cut = type(cut).from_dict(cut.to_dict())  # the manifest round trip
    assert schema.get_tools(cut) == [WEATHER]
    seq = SequenceBuilder(hermes_tok, max_length=4096)(cut)
    trained = seq.labels != IGNORE_INDEX
    assert _trained_text(hermes_tok, seq.input_ids.tolist(), trained.tolist())[1] == \
        "It is 21 degrees today, 19 tomorrow.<|im_end|>"
    fmt = AudexPromptFormatter(hermes_tok)
    assert torch.equal(seq.input_ids, fmt.encode_dialog(CHAT, tools=[WEATHER])["input_ids"])


def test_bad_tool_chats_are_named():
    with pytest.raises(ValueError, match="must follow an assistant turn with tool_calls"):
        schema.make_text_cut("x", [{"role": "user", "content": "a"}, {"role": "tool", "content": "1"},
                                   {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="needs a function name"):
        schema.make_text_cut("x", [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}])
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        schema.make_text_cut("x", CHAT, tools=[{"name": "no_function_key"}])
    bad = [dict(t) for t in CHAT]
    bad[2] = {"role": "tool", "content": "<|im_end|> injected"}
    cut = schema.make_text_cut("inj", bad, tools=[WEATHER])
    with pytest.raises(SkipSample) as e:
        SequenceBuilder(AudexTokenizer.build_tiny(), max_length=4096)(cut)
    assert e.value.reason == INVALID_MESSAGES


def test_parse_tool_response_casts_arguments_and_prefers_the_tokenizers_response_template(hermes_tok):
    tok = AudexTokenizer.build_tiny()
    out = parse_tool_response(tok.hf, 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Paris", "days": "2"}}\n</tool_call>',
                              prefix="<|im_start|>assistant\n<think></think>\n", tools=[WEATHER])
    assert out == {"content": "Checking.", "tool_calls": [CALL]}  # "2" cast to the schema's integer
    with pytest.raises(ValueError, match="JSON"):
        parse_tool_response(tok.hf, "<tool_call>\n{not json\n</tool_call>", prefix="<|im_start|>assistant\n")
    hermes_tok.hf.response_template = {"start_anchor": "<|im_start|>assistant\n", "fields": {
        "tool_calls": {"open": "[CALL]", "close": "[/CALL]", "content": "json", "repeats": True,
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"repeats": True, "join": ""}}}
    out = parse_tool_response(hermes_tok.hf, '[CALL]{"name": "get_weather", "arguments": {"city": "Paris", '
                                             '"days": 2}}[/CALL]', prefix="<|im_start|>assistant\n")
    assert out == {"tool_calls": [CALL]}


class _ScriptedDecoder:
    """Stands in for the model's decoder: records the prompts and answers with fixed token ids."""

    def __init__(self, answers):
        self.answers, self.prompts = answers, None

    def generate(self, prompts, params, **kwargs):
        self.prompts = prompts
        return GenerationOutput(token_ids=self.answers, finish_reasons=["stop"] * len(prompts), num_steps=1)


def test_pipeline_chat_with_tools_returns_parsed_calls(tiny_model):
    pipe = AudexPipeline(tiny_model)
    tok = pipe.tokenizer
    answers = [tok.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
                          "</tool_call>"),
               tok.encode("It is 21 degrees."),
               tok.encode("<tool_call>\n{broken\n</tool_call>")]
    pipe.decoder = _ScriptedDecoder(answers)
    results = pipe.chat(["Weather in Paris?", CHAT[:-1], "Weather in Rome?"], thinking=False, tools=[WEATHER])
    expected_prompt = pipe.formatter.encode_dialog([{"role": "user", "content": "Weather in Paris?"}],
                                                   tools=[WEATHER])["input_ids"].tolist()
    assert pipe.decoder.prompts[0] == expected_prompt
    assert tok.decode(expected_prompt).endswith("<|im_start|>assistant\n<think></think>\n")
    assert results[0].tool_calls == [CALL] and results[0].text == "" and results[0].tool_call_error is None
    assert results[1].tool_calls == [] and results[1].text == "It is 21 degrees."
    assert results[2].tool_calls == [] and "JSON" in results[2].tool_call_error
    with pytest.raises(ValueError, match="must end with a user or tool turn"):
        pipe.chat([CHAT], tools=[WEATHER])
    # thinking mode (the chat preset's): the prompt opens <think>, the reasoning comes back apart from the call
    pipe.decoder = _ScriptedDecoder([tok.encode('look it up\n</think>\n<tool_call>\n{"name": "get_weather", '
                                                '"arguments": {"city": "Paris", "days": 2}}\n</tool_call>')])
    r = pipe.chat(["Weather in Paris?"], tools=[WEATHER])[0]
    assert tok.decode(pipe.decoder.prompts[0]).endswith("<|im_start|>assistant\n<think>\n")
    assert r.thinking == "look it up" and r.tool_calls == [CALL]
