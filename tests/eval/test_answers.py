"""Answer extraction on a table of tricky model outputs."""

import pytest

from audex.eval.answers import (
    extract_boxed,
    extract_choice,
    extract_label,
    extract_short_answer,
    resolve_gold_choice,
    short_answers_match,
)

CHOICES = ["cat meowing", "dog barking", "rain on a roof", "car horn"]

MCQ_TABLE = [
    # the letter alone, in every dress
    ("B", "B"), ("(B)", "B"), ("b", "B"), ("b.", "B"), ("**B**", "B"), ("A.", "A"), ("a", "A"),
    # explicit statements, any case
    ("The answer is C", "C"), ("the answer is c.", "C"), ("The correct option is D.", "D"),
    ("Option (B) is correct", "B"), ("The answer is **(C)**", "C"), ("Answer: (B) dog barking", "B"),
    # a leading letter followed by the option text
    ("B. Dog barking", "B"), ("(a) cat meowing", "A"),
    # the option text, alone or in a sentence, any case
    ("dog barking", "B"), ("Rain on a roof!", "C"), ("I hear a dog barking in the background.", "B"),
    # "A" as an article must not be read as option A
    ("The answer is A dog barking.", "B"),
    ("To answer this, I listened carefully: it's rain on a roof.", "C"),
    # thinking mode: only the text after </think> counts; a cut-off reasoning has no answer
    ("<think>maybe A</think>The answer is (D).", "D"), ("<think>The answer is A but", None),
    # \boxed{}
    ("\\boxed{C}", "C"), ("Final: \\boxed{\\text{rain on a roof}}", "C"),
    # no commitment
    ("It could be a cat meowing or a dog barking.", None), ("I am not sure.", None), ("", None),
    ("E", None),  # not an option of a 4-way question
]


@pytest.mark.parametrize("response, expected", MCQ_TABLE)
def test_extract_choice(response, expected):
    assert extract_choice(response, CHOICES) == expected


LABEL_TABLE = [
    ("Yes", "yes"), ("yes.", "yes"), ("YES!", "yes"), ("Maybe", "maybe"), ("The answer is maybe.", "maybe"),
    ("No, there is no dog in this recording.", "no"), ("Answer: No", "no"),
    ("Based on the audio, yes, a dog barks.", "yes"), ("True", "yes"), ("FALSE", "no"),
    ("The description is correct.", "yes"), ("The description is not correct.", "no"),
    ("That is not true, it is rain.", "no"), ("It is not possible to say; I am not sure.", "maybe"),
    ("<think>no wait</think> Yes", "yes"), ("\\boxed{No}", "no"), ("I hear birds.", None), ("", None),
]


@pytest.mark.parametrize("response, expected", LABEL_TABLE)
def test_extract_entailment_label(response, expected):
    assert extract_label(response, ("yes", "no", "maybe")) == expected


def test_hallucination_labels_exclude_maybe():
    assert extract_label("I am not sure", ("yes", "no")) is None
    assert extract_label("Maybe... yes, I heard it.", ("yes", "no")) == "yes"
    assert extract_label("No.", ("yes", "no")) == "no"


BOXED_TABLE = [
    ("so the answer is \\boxed{{7}}.", "7"),                      # the doubled braces of the A.8 prompt
    ("The answer is \\boxed{\\text{valid}}.", "valid"),
    ("first \\boxed{3} then corrected: \\boxed{4}", "4"),          # the last box wins
    ("\\boxed{ {x^{2}} }", "x^{2}"),                              # nested braces stay balanced
    ("$\\boxed{True}$", "True"),
    ("<think>\\boxed{1}</think>The answer is \\boxed{2}.", "2"),
    ("no box here", None), ("\\boxed{unclosed", None),
]


@pytest.mark.parametrize("text, expected", BOXED_TABLE)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_short_answers_for_speech_to_speech():
    assert extract_short_answer("Let me think. The answer is seven.") == "seven"
    assert extract_short_answer("Reasoning... The answer is \\boxed{{invalid}}.") == "invalid"
    assert extract_short_answer("I do not know") is None
    assert short_answers_match("Seven.", "7")           # the English normaliser makes them equal
    assert short_answers_match("VALID", "valid")
    assert not short_answers_match("invalid", "valid")
    assert not short_answers_match(None, "valid")


def test_gold_answers_resolve_to_letters():
    assert resolve_gold_choice("dog barking", CHOICES) == "B"
    assert resolve_gold_choice("(C)", CHOICES) == "C"
    assert resolve_gold_choice("a", CHOICES) == "A"
    with pytest.raises(ValueError, match="neither an option letter"):
        resolve_gold_choice("a bird", CHOICES)
