"""Tool-calling chats: tool definitions in the system turn, assistant tool calls, tool responses.

Figure 2a of the paper points to the backbone's own tool-calling templates (and appendix A.1 enables tools with
a system-prompt postfix), so Audex does not invent a format: a tool chat is rendered by the backbone
tokenizer's ``chat_template`` through transformers' ``apply_chat_template``, and a generated answer is read back
by transformers' ``parse_response`` with the tokenizer's ``response_template``. A tokenizer without a chat
template (the tiny model's) gets :data:`AUDEX_TOOL_CHAT_TEMPLATE`: Figure 2's turns (``<think></think>\\n`` in
instruct mode, no ``\\n`` after the last ``<|im_end|>``) with the Hermes/Qwen tool sections::

    <|im_start|>system
    You are a helpful and harmless assistant.

    # Tools
    ...
    <tools>
    {"type": "function", "function": {"name": "get_weather", ...}}
    </tools>
    ...<|im_end|>
    <|im_start|>user
    Weather in Paris?<|im_end|>
    <|im_start|>assistant
    <think></think>
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call><|im_end|>
    <|im_start|>user
    <tool_response>
    {"temp_c": 21}
    </tool_response><|im_end|>
    <|im_start|>assistant
    <think></think>
    It is 21 degrees.<|im_end|>

Without tools it renders plain chats exactly as :class:`~audex.prompts.AudexPromptFormatter` does.

**Which tokens train** (:func:`assistant_spans`): for assistant message i, the text between the generation
prompt of ``messages[:i]`` and the end of the rendering of ``messages[:i+1]`` (trailing whitespace after the
end-of-turn token excluded), provided the full chat's rendering starts with it. A turn the template renders
differently once later messages follow (e.g. reasoning dropped before a later user turn) is context, untrained,
as Audex's latest-turn thought retention has it. transformers' ``return_assistant_tokens_mask`` would need
``{% generation %}`` markers that backbone templates do not carry; this prefix rule needs none.

Messages follow transformers' chat format: ``{"role": "assistant", "content": str, "tool_calls": [{"type":
"function", "function": {"name": str, "arguments": dict}}]}``, ``{"role": "tool", "content": str}``; Audex's
``thinking`` key is passed on as ``reasoning_content``.

Example::

    >>> spans_text, spans = assistant_spans(lambda msgs, gen: render_chat(tok.hf, msgs, tools, gen), messages)
    >>> parse_tool_response(tok.hf, '<tool_call>\\n{"name": "f", "arguments": {}}\\n</tool_call>', prefix=prompt)
    {'tool_calls': [{'type': 'function', 'function': {'name': 'f', 'arguments': {}}}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from transformers.utils.chat_parsing import parse_response

from audex.vocab import IM_END, IM_START

TOOLS_SYSTEM_PROMPT = "You are a helpful and harmless assistant."

#: Figure 2's turns + Hermes/Qwen tool sections (for tokenizers without a chat template of their own)
AUDEX_TOOL_CHAT_TEMPLATE = "".join((
    "{% set ns = namespace(last_user=-1) %}",
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}",
    "{% set thinking = enable_thinking is defined and enable_thinking %}",
    "{% if tools %}",
    "{{ '<|im_start|>system\n' }}",
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}",
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}",
    "{{ 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}",
    "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}",
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}",
    "{{ '<tool_call></tool_call> XML tags:\n<tool_call>\n' }}",
    "{{ '{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>' }}",
    "{% elif messages[0].role == 'system' %}",
    "{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>' }}",
    "{% endif %}",
    "{% for m in messages %}",
    "{% set sep = '\n' if (tools or not loop.first) else '' %}",
    "{% if m.role == 'user' %}",
    "{{ sep + '<|im_start|>user\n' + m.content + '<|im_end|>' }}",
    "{% elif m.role == 'assistant' %}",
    "{{ sep + '<|im_start|>assistant\n' }}",
    "{% if thinking and loop.index0 > ns.last_user %}",
    "{{ '<think>\n' + (m.reasoning_content or '') + '\n</think>\n' }}",
    "{% else %}{{ '<think></think>\n' }}{% endif %}",
    "{{ m.content or '' }}",
    "{% for call in m.tool_calls or [] %}",
    "{% set call = call.function if call.function is defined else call %}",
    "{% if (loop.first and m.content) or not loop.first %}{{ '\n' }}{% endif %}",
    "{{ '<tool_call>\n{\"name\": ' }}{{ call.name | tojson }}{{ ', \"arguments\": ' }}",
    "{% if call.arguments is string %}{{ call.arguments }}{% else %}{{ call.arguments | tojson }}{% endif %}",
    "{{ '}\n</tool_call>' }}",
    "{% endfor %}",
    "{{ '<|im_end|>' }}",
    "{% elif m.role == 'tool' %}",
    "{% if loop.first or loop.previtem.role != 'tool' %}{{ sep + '<|im_start|>user' }}{% endif %}",
    "{{ '\n<tool_response>\n' + m.content + '\n</tool_response>' }}",
    "{% if loop.last or loop.nextitem.role != 'tool' %}{{ '<|im_end|>' }}{% endif %}",
    "{% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "{{ '\n<|im_start|>assistant\n' + ('<think>\n' if thinking else '<think></think>\n') }}",
    "{% endif %}",
))

#: transformers response template that reads a generated answer of the built-in format back
AUDEX_TOOL_RESPONSE_TEMPLATE = {
    "start_anchor": f"{IM_START}assistant\n",
    "fields": {
        "thinking": {"open": "<think>", "close": "</think>"},
        "tool_calls": {"open": "<tool_call>", "close": "</tool_call>", "content": "json", "repeats": True,
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"repeats": True, "join": ""},
    },
}


def is_tool_chat(turns: Sequence[dict], tools: Sequence[dict] | None = None) -> bool:
    """True when the chat has tool definitions, tool calls or tool responses."""
    return bool(tools) or any(t.get("role") == "tool" or t.get("tool_calls") for t in turns)


def validate_tools(tools: Any, name: str = "tools") -> list[dict]:
    """Tool definitions in the OpenAI / transformers form ``{"type": "function", "function": {"name", ...}}``."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ValueError(f"{name} must be a non-empty list of tool definitions, got {tools!r:.80}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{name}[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                             f"...}}}}, got {tool!r:.120}")
    return [dict(t) for t in tools]


def load_tools(tools: Any) -> list[dict]:
    """Tool definitions given as a list, or as the path of a JSON file holding that list (the CLIs'
    ``inputs.tools=tools.json``); checked with :func:`validate_tools`."""
    if isinstance(tools, (str, Path)):
        path = Path(tools)
        if not path.is_file():
            raise ValueError(f"tools file {str(path)!r} does not exist: give a JSON file with a list of tool definitions")
        try:
            tools = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"tools file {str(path)!r} is not JSON ({e})") from None
        return validate_tools(tools, f"the tools in {str(path)!r}")
    return validate_tools(tools)


def validate_tool_calls(calls: Any, where: str) -> list[dict]:
    """Assistant tool calls: ``[{"type": "function", "function": {"name": str, "arguments": dict | str}}]``;
    the bare ``{"name", "arguments"}`` form is accepted and wrapped."""
    if not isinstance(calls, (list, tuple)) or not calls:
        raise ValueError(f"{where}: tool_calls must be a non-empty list, got {calls!r:.80}")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{where}: tool call {k} needs a function name, got {call!r:.120}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: tool call {k} has arguments that are not JSON ({e})") from None
        elif not isinstance(args, dict):
            raise ValueError(f"{where}: tool call {k} arguments must be a dict or a JSON string, got {args!r:.80}")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def to_template_messages(turns: Sequence[dict]) -> list[dict]:
    """Audex turns -> transformers chat messages (``thinking`` -> ``reasoning_content``); chat markers inside a
    message would break the turn structure and are refused."""
    out = []
    for i, turn in enumerate(turns):
        m = {k: v for k, v in turn.items() if k != "thinking"}
        if turn.get("thinking"):
            m["reasoning_content"] = turn["thinking"]
        text = json.dumps(m, ensure_ascii=False)
        if IM_START in text or IM_END in text:
            raise ValueError(f"turn {i} contains {IM_START} or {IM_END} and would break the turn structure")
        out.append(m)
    return out


def render_chat(hf_tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None, add_generation_prompt: bool,
                thinking: bool = False, chat_template: str | None = None) -> str:
    """The chat as the template renders it (``apply_chat_template(..., tokenize=False)``)."""
    return hf_tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                            chat_template=chat_template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, enable_thinking=thinking)


def assistant_spans(render: Callable[[Sequence[dict], bool], str], messages: Sequence[dict]
                    ) -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the whole chat (with the generation prompt when it does not end with an assistant
    turn) and the ``[start, end)`` character spans of the trained assistant turns (see the module docstring).
    ``render(messages, add_generation_prompt)`` renders a chat."""
    ends_with_answer = messages[-1]["role"] == "assistant"
    full = render(messages, not ends_with_answer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        prompt = render(messages[:i], True)
        through = render(messages[: i + 1], False)
        if not (through.startswith(prompt) and full.startswith(through)):
            continue  # rendered differently in the full chat: context, untrained
        end = len(through.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return full, spans


def chat_template_for(hf_tokenizer, configured: str | None = None) -> str | None:
    """The template of tool chats: ``configured``, else the tokenizer's own (None lets transformers pick it, a
    ``tool_use`` variant included), else :data:`AUDEX_TOOL_CHAT_TEMPLATE`."""
    if configured is not None:
        return configured
    return None if getattr(hf_tokenizer, "chat_template", None) else AUDEX_TOOL_CHAT_TEMPLATE


def tool_chat_messages(turns: Sequence[dict], thinking: bool, default_system: str | None) -> list[dict]:
    """Audex turns -> template messages, with ``default_system`` as the system turn when there is none."""
    turns = list(turns)
    if not turns:
        raise ValueError("turns must be a non-empty list")
    for i, t in enumerate(turns):
        if not isinstance(t.get("content", ""), str):
            raise ValueError(f"{t.get('role')} turn {i} of a tool chat: content must be a string")
        if t.get("thinking") and not thinking:
            raise ValueError(f"assistant turn {i} carries reasoning but the dialog is in instruct mode")
    if turns[0].get("role") != "system" and default_system is not None:
        turns.insert(0, {"role": "system", "content": default_system})
    return to_template_messages(turns)


def tool_chat_parts(hf_tokenizer, turns: Sequence[dict], thinking: bool, tools: Sequence[dict] | None,
                    default_system: str | None, chat_template: str | None) -> list[tuple[str, bool]]:
    """The tool chat as ``(text, trained)`` stretches, in order (:func:`assistant_spans`)."""
    messages = tool_chat_messages(turns, thinking, default_system)
    text, spans = assistant_spans(
        lambda m, gen: render_chat(hf_tokenizer, m, tools, gen, thinking, chat_template), messages)
    out, pos = [], 0
    for start, end in spans:
        if start > pos:
            out.append((text[pos:start], False))
        out.append((text[start:end], True))
        pos = end
    if pos < len(text):
        out.append((text[pos:], False))
    return out


def parse_tool_response(hf_tokenizer, generated: str, prefix: str, tools: Sequence[dict] | None = None) -> dict:
    """A generated answer -> ``{"content", "thinking", "tool_calls"}`` (keys present when found), with the
    tokenizer's ``response_template`` or, lacking one, :data:`AUDEX_TOOL_RESPONSE_TEMPLATE`; ``prefix`` is the
    prompt (templates pre-write ``<think>`` in it). Tool-call arguments are cast to the tools' JSON schema.
    Raises ``ValueError`` for a tool call that is not valid JSON."""
    schema = getattr(hf_tokenizer, "response_template", None) or AUDEX_TOOL_RESPONSE_TEMPLATE
    return parse_response(generated, schema, prefix=prefix, tools=list(tools) if tools else None)


def parse_tool_responses(hf_tokenizer, generated: Sequence[str], prefixes: Sequence[str],
                         tools: Sequence[dict] | None = None) -> list[tuple[dict, str | None]]:
    """:func:`parse_tool_response` per answer, as ``(parsed, error)``: an answer whose tool call is not valid JSON
    comes back whole as ``{"content": ...}`` with the reason, so one bad answer does not fail a batch."""
    out = []
    for text, prefix in zip(generated, prefixes):
        try:
            out.append((parse_tool_response(hf_tokenizer, text, prefix, tools), None))
        except ValueError as e:
            out.append(({"content": text}, str(e).splitlines()[0]))
    return out
