"""Final-answer extraction from a reasoning response: the ``\\boxed{}`` rule of the speech-to-speech cascade
(appendix A.8: "we extract the answer from the \\boxed{{X}} outputs with some regex rules").

Shared by the S2S pipeline (which speaks "The answer is {answer}") and the evaluation harness (which scores it).

Example::

    >>> extract_short_answer("<think>3+4</think> So the answer is \\boxed{{7}}.")
    '7'
"""

from __future__ import annotations

import re

_THINK_END = "</think>"
_THINK_START = "<think>"


def final_answer_text(response: str) -> str:
    """The part of a response that carries the answer: after the last ``</think>``; an unclosed ``<think>``
    (reasoning cut off by the length limit) leaves no answer."""
    text = response or ""
    if _THINK_END in text:
        return text.rsplit(_THINK_END, 1)[1]
    if _THINK_START in text:
        return ""
    return text


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), with doubled braces ``{{X}}``, ``\\text{}`` and
    ``$`` removed; ``None`` if there is none."""
    text = final_answer_text(text)
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return _clean_boxed(text[i + 1: j])
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def _clean_boxed(content: str) -> str:
    content = content.strip()
    while content.startswith("{") and content.endswith("}"):
        content = content[1:-1].strip()
    content = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", content)
    return content.replace("$", "").strip()


_ANSWER_IS = re.compile(r"the answer is\s*:?\s*(.+?)\s*(?:[.!?]\s*)?$", re.IGNORECASE | re.DOTALL)


def extract_short_answer(response: str) -> str | None:
    """The final answer of a reasoning output: ``\\boxed{}`` content, else what follows the last "The answer is"."""
    boxed = extract_boxed(response)
    if boxed:
        return boxed
    text = final_answer_text(response)
    idx = text.lower().rfind("the answer is")
    if idx == -1:
        return None
    m = _ANSWER_IS.match(text[idx:].strip())
    return m.group(1).strip() if m and m.group(1).strip() else None
