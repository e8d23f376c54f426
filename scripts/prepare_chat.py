#!/usr/bin/env python
"""JSONL chats -> an Audex text-SFT manifest (cuts without recordings), thinking or instruct mode.

One chat per line, in the common ``messages`` layout::

    {"id": "c1", "messages": [{"role": "system", "content": "..."},
                              {"role": "user", "content": "What is 2+2?"},
                              {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}]}

The reasoning of an assistant turn is read from ``thinking``, ``reasoning_content`` or a leading
``<think>...</think>`` in its content. The mode of a chat (``--mode auto``) is its ``"thinking"`` field if
present, else thinking when any assistant turn carries reasoning, else instruct; ``--mode thinking`` or
``instruct`` forces it (an instruct chat must not carry reasoning: such rows are skipped, not stripped).
Content given as a list of ``{"type": "text", "text": ...}`` parts is joined. Chats that do not end with an
assistant turn are skipped with a reason.

Tool-calling chats (:mod:`audex.tool_calls`) keep the OpenAI / transformers layout: a ``"tools"`` list of
``{"type": "function", "function": {...}}`` definitions beside ``messages``, assistant turns with
``"tool_calls"`` and ``{"role": "tool", "content": ...}`` responses (their ``tool_call_id``/``name`` are dropped:
the chat template places responses in order)::

    {"id": "t1", "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
                      {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "{\"temp_c\": 21}"},
                  {"role": "assistant", "content": "It is 21 degrees."}]}

    python scripts/prepare_chat.py sft/math.jsonl -o manifests/math_sft.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from lhotse.cut import Cut

from audex.data import schema
from audex.data.prepare import add_output_args, write_manifest
from audex.data.skips import INVALID_MESSAGES, MISSING_FIELD, SkipSample
from audex.vocab import THINK_END, THINK_START

LEADING_THINK = re.compile(rf"^\s*{re.escape(THINK_START)}(.*?){re.escape(THINK_END)}\s*", re.DOTALL)
MODES = ("auto", "thinking", "instruct")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError(f"content must be a string or a list of text parts, got {str(content)[:80]!r}")


def normalise_message(msg: Any) -> dict:
    """One turn in the schema's form: ``{"role", "content"[, "thinking"]}``."""
    if not isinstance(msg, dict):
        raise ValueError(f"a turn must be an object, got {str(msg)[:80]!r}")
    role = msg.get("role")
    if role not in schema.ROLES:
        raise ValueError(f"role {role!r} is not supported (only {schema.ROLES})")
    content = _text(msg.get("content") if msg.get("content") is not None else "")
    out = {"role": role, "content": content}
    if role == "assistant" and msg.get("tool_calls"):
        out["tool_calls"] = msg["tool_calls"]
    if role == "assistant":
        reasoning = msg.get("thinking") or msg.get("reasoning_content")
        match = LEADING_THINK.match(content)
        if match:
            if reasoning:
                raise ValueError("an assistant turn has both a reasoning field and <think> in its content")
            reasoning, out["content"] = match.group(1), content[match.end():]
        if reasoning is not None and str(reasoning).strip():
            out["thinking"] = str(reasoning).strip("\n")
    return out


def iter_cuts(jsonl: Path, mode: str) -> Iterator[Cut | SkipSample]:
    with jsonl.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield SkipSample(MISSING_FIELD, f"line {line_no} is not JSON ({e})", cut_id=f"chat_{line_no}")
                continue
            chat_id = str(record.get("id") or f"chat_{line_no}") if isinstance(record, dict) else f"chat_{line_no}"
            if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
                yield SkipSample(MISSING_FIELD, f"line {line_no} has no 'messages' list", cut_id=chat_id)
                continue
            try:
                messages = [normalise_message(m) for m in record["messages"]]
                has_reasoning = any("thinking" in m for m in messages)
                if mode == "auto":
                    thinking = bool(record["thinking"]) if "thinking" in record else has_reasoning
                else:
                    thinking = mode == "thinking"
                yield schema.make_text_cut(chat_id, messages, thinking=thinking, tools=record.get("tools"))
            except ValueError as e:
                yield SkipSample(INVALID_MESSAGES, f"line {line_no}: {e}", cut_id=chat_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--mode", choices=MODES, default="auto", help="reasoning mode of every chat (default auto)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.jsonl.is_file():
        parser.error(f"{args.jsonl} does not exist")
    return write_manifest(iter_cuts(args.jsonl, args.mode), args.output, "prepare_chat", args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
