"""Chat turns of text-only cuts (``custom["messages"]``), tool-calling chats included: what a valid chat is.

A chat is a list of ``{"role", "content"[, "thinking", "tool_calls"]}`` turns (:data:`ROLES`); the rules are
:func:`validate_messages`'s. :mod:`audex.data.schema` reads and writes chats with them, and
:mod:`audex.tool_calls` renders tool chats.

Example::

    >>> validate_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], False)
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]
"""

from __future__ import annotations

from typing import Any

from audex.data.skips import INVALID_MESSAGES, SkipSample
from audex.tool_calls import validate_tool_calls

ROLES = ("system", "user", "assistant", "tool")


def validate_messages(messages: Any, thinking: bool, cut_id: str | None = None, error=None) -> list[dict]:
    """Check a chat: a list of ``{"role", "content"[, "thinking", "tool_calls"]}`` with at least one user and one
    assistant turn, ending with an assistant turn; an optional system turn comes first; ``thinking`` (the
    reasoning text) only on assistant turns, and only in thinking mode; ``tool_calls`` only on assistant turns,
    and ``tool`` turns (tool responses) only after an assistant turn with tool calls or another tool turn.
    Returns plain dicts (JSON-serialisable)."""

    def fail(msg: str):
        if error is not None:
            raise error(f"chat {cut_id!r}: {msg}")
        raise SkipSample(INVALID_MESSAGES, msg, cut_id)

    if not isinstance(messages, (list, tuple)) or not messages:
        fail(f"messages must be a non-empty list of turns, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            fail(f"turn {i} must be a dict with role in {ROLES}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            fail(f"turn {i} ({m['role']}) needs a string 'content'")
        if m["role"] == "system" and i != 0:
            fail(f"the system turn must come first, found it at turn {i}")
        extra = set(m) - {"role", "content", "thinking", "tool_calls"}
        if extra:
            fail(f"turn {i} has unknown keys {sorted(extra)}; allowed: role, content, thinking, tool_calls")
        if "tool_calls" in m:
            if m["role"] != "assistant":
                fail(f"turn {i}: only assistant turns carry tool_calls")
            try:
                calls = validate_tool_calls(m["tool_calls"], f"turn {i}")
            except ValueError as e:
                fail(str(e))
        if m["role"] == "tool" and (not out or not (out[-1]["role"] == "tool" or out[-1].get("tool_calls"))):
            fail(f"turn {i}: a tool response must follow an assistant turn with tool_calls")
        reasoning = m.get("thinking")
        if reasoning is not None:
            if m["role"] != "assistant" or not isinstance(reasoning, str):
                fail(f"turn {i}: only assistant turns carry a 'thinking' string")
            if reasoning.strip() and not thinking:
                fail(f"turn {i} has reasoning but the chat is in instruct mode (custom['thinking']=False)")
        out.append({k: m[k] for k in ("role", "content", "thinking") if k in m})
        if "tool_calls" in m:
            out[-1]["tool_calls"] = calls
    roles = [m["role"] for m in out]
    if "user" not in roles or roles[-1] != "assistant":
        fail(f"a chat needs a user turn and must end with an assistant turn, got roles {roles}")
    return out
