"""Answer extraction: from what a model says to the label a benchmark scores.

Models answer multiple-choice questions in many ways — "B", "(B)", "b.", "The answer is C", "Answer: (B) dog
barking", the option's text alone, or a sentence that contains it — and closed questions with "Yes.", "No, there
is no ...", "The answer is maybe". The functions here map such outputs to a letter or a label, or to ``None``
when the output does not commit to exactly one (scored as wrong, and counted as "no answer" in the summary).
Thinking-mode outputs are scored on the text after ``</think>`` only, as the paper does for thinking baselines.

:func:`extract_boxed` implements the ``\\boxed{}`` extraction of the speech-to-speech cascade (appendix A.8),
whose reasoning prompt ends with "Conclude your response with the sentence 'The answer is \\boxed{{X}}.'".

No library covers these benchmark-specific rules (MMAU/AF3 scripts are ad hoc regexes), hence this module; its
behaviour is pinned by a table of tricky outputs in ``tests/test_eval_answers.py``.

Example::

    >>> extract_choice("I think it is (C) rain on a roof.", ["cat", "dog", "rain on a roof", "car"])
    'C'
    >>> extract_choice("a dog barking", ["cat meowing", "a dog barking", "rain", "car horn"])
    'B'
    >>> extract_label("No, there is no dog in this recording.", ("yes", "no"))
    'no'
    >>> extract_boxed("... so the answer is \\\\boxed{{7}}.")
    '7'
"""

from __future__ import annotations

import re
import string
from typing import Sequence

from audex.eval.normalize import normalize_for_wer
from audex.inference.answers import extract_boxed, extract_short_answer, final_answer_text  # noqa: F401 (re-exported)

LETTERS = string.ascii_uppercase

# ---- shared helpers ------------------------------------------------------------------------------
def _plain(text: str) -> str:
    """Lower case, punctuation (except apostrophes inside words) to spaces, whitespace collapsed."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"[^\w\s']|(?<!\w)'|'(?!\w)", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _contains_phrase(haystack: str, phrase: str) -> bool:
    return bool(phrase) and re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", haystack) is not None


# ---- multiple choice -----------------------------------------------------------------------------
_EXPLICIT = re.compile(
    r"(?:answer|option|choice)(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?\s*[:\-]?\s*(?:\*\*)?(\()?\s*([A-Za-z])(?![A-Za-z])",
    re.IGNORECASE,
)
_WHOLE_LETTER = re.compile(r"^\s*[\"'*]*\(?\s*([A-Za-z])\s*\)?[\"'*]*\s*[.:)]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*[\"'*]*(?:\(([A-Za-z])\)|([A-Z])[.:)])\s")
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
_DELIMITERS = ".,;:!?)]*\"'\n"


def option_letters(num_choices: int) -> str:
    if not 1 <= num_choices <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 1-{len(LETTERS)} options, got {num_choices}")
    return LETTERS[:num_choices]


def _letter_fits(letter: str, rest: str, in_parens: bool, choices: Sequence[str]) -> bool:
    """Whether a letter after "answer is" really names an option: it is followed by a delimiter, nothing, or the
    text of that very option. A lower-case letter also needs parentheses or a delimiter (it may be the article
    "a"), and "The answer is A dog barking" is not option A when A is "cat meowing"."""
    rest = rest.lstrip(" )*")
    if not rest or rest[0] in _DELIMITERS:
        return True
    if letter.islower() and not in_parens:
        return False
    option = _plain(choices[LETTERS.index(letter.upper())])
    return bool(option) and _plain(rest).startswith(option)


def _match_option_text(text: str, choices: Sequence[str]) -> str | None:
    """The one option whose text occurs in ``text`` (whole words, case and punctuation ignored)."""
    plain = _plain(text)
    options = [_plain(c) for c in choices]
    hits = [i for i, o in enumerate(options) if _contains_phrase(plain, o)]
    # an option contained in a longer matched option ("dog" vs "dog barking") is not a separate hit
    hits = [i for i in hits if not any(options[j] != options[i] and _contains_phrase(options[j], options[i]) for j in hits)]
    return LETTERS[hits[0]] if len(hits) == 1 else None


def extract_choice(response: str, choices: Sequence[str]) -> str | None:
    """The option letter ("A", "B", ...) a response commits to, or ``None``.

    Order of evidence: ``\\boxed{}``; an explicit "answer/option/choice (is) X"; the whole response being a
    letter; a leading "(B) ..." / "B. ..."; the text of exactly one option appearing in the response; exactly one
    parenthesised letter anywhere.
    """
    letters = option_letters(len(choices))
    text = final_answer_text(response).strip()
    if not text:
        return None

    boxed = extract_boxed(text)
    if boxed:
        found = extract_choice(boxed, choices)
        if found:
            return found

    for m in _EXPLICIT.finditer(text):
        letter = m.group(2)
        if letter.upper() in letters and _letter_fits(letter, text[m.end():], m.group(1) is not None, choices):
            return letter.upper()

    m = _WHOLE_LETTER.match(text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()

    m = _LEADING_LETTER.match(text)
    if m and (m.group(1) or m.group(2)).upper() in letters:
        return (m.group(1) or m.group(2)).upper()

    by_text = _match_option_text(text, choices)
    if by_text:
        return by_text

    parens = {p.upper() for p in _PAREN_LETTER.findall(text) if p.upper() in letters}
    return parens.pop() if len(parens) == 1 else None


def resolve_gold_choice(answer: str, choices: Sequence[str]) -> str:
    """A reference answer given as a letter ("B", "(B)") or as the option's text -> its letter."""
    letters = option_letters(len(choices))
    raw = str(answer).strip()
    m = _WHOLE_LETTER.match(raw)
    if m and m.group(1).upper() in letters and len(raw.strip("()*. ")) == 1:
        return m.group(1).upper()
    plain = _plain(raw)
    matches = [i for i, c in enumerate(choices) if _plain(c) == plain]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise ValueError(f"reference answer {answer!r} is neither an option letter ({letters}) nor the text of exactly one "
                     f"option {list(choices)}")


# ---- yes / no / maybe ----------------------------------------------------------------------------
LABEL_SYNONYMS: dict[str, tuple[str, ...]] = {
    "yes": ("yes", "true", "correct", "yeah", "yep"),
    "no": ("no", "false", "incorrect", "nope", "not true", "not correct", "isn't true", "is not true", "not accurate"),
    "maybe": ("maybe", "uncertain", "unclear", "possibly", "perhaps", "not sure", "cannot be determined",
              "can't be determined", "cannot determine", "can't tell", "cannot tell", "neutral", "unknown"),
}


def _label_of(word_or_phrase: str, labels: Sequence[str]) -> str | None:
    for label in labels:
        if word_or_phrase in LABEL_SYNONYMS.get(label, (label,)):
            return label
    return None


def extract_label(response: str, labels: Sequence[str] = ("yes", "no", "maybe")) -> str | None:
    """The closed-set label (``yes``/``no``/``maybe`` for entailment, ``yes``/``no`` for hallucination) a response
    commits to, or ``None``.

    Order of evidence: ``\\boxed{}``; "the answer is X" / "answer: X"; the first word; otherwise the earliest label
    word or phrase in the text ("There is no dog barking" -> ``no``). Synonyms: true/correct -> yes,
    false/incorrect -> no, "not sure"/"cannot be determined"/... -> maybe (only when ``maybe`` is allowed).
    """
    labels = tuple(label.lower() for label in labels)
    text = final_answer_text(response)
    boxed = extract_boxed(text)
    if boxed:
        found = _label_of(_plain(boxed), labels)
        if found:
            return found
    plain = _plain(text)
    if not plain:
        return None
    phrases = sorted({p for label in labels for p in LABEL_SYNONYMS.get(label, (label,))}, key=len, reverse=True)
    alternation = "|".join(re.escape(p) for p in phrases)
    m = re.search(rf"\banswer (?:is |would be |should be )?({alternation})\b", plain)
    if m:
        return _label_of(m.group(1), labels)
    first = _label_of(plain.split()[0], labels)
    if first:
        return first
    earliest = None
    for p in phrases:
        m = re.search(rf"(?<!\w){re.escape(p)}(?!\w)", plain)
        if m and (earliest is None or m.start() < earliest[0]):
            earliest = (m.start(), p)
    return _label_of(earliest[1], labels) if earliest else None


# ---- free-form short answers (speech-to-speech) --------------------------------------------------
def normalize_short_answer(answer: str) -> str:
    """Comparable form of a short answer: the English WER normaliser ("Seven." -> "7", "Valid" -> "valid")."""
    return normalize_for_wer(answer, "en")


def short_answers_match(predicted: str | None, gold: str) -> bool:
    return predicted is not None and normalize_short_answer(predicted) == normalize_short_answer(gold) != ""
