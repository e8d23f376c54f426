"""WER normalisation on golden strings: the Open ASR leaderboard's English normaliser, the basic one elsewhere."""

import pytest

from audex.eval.metrics import word_errors
from audex.eval.normalize import is_english, normalize_for_wer

ENGLISH_GOLDEN = [
    # numbers: spelled-out numbers become digits, "percent" a sign, ordinals keep their suffix
    ("Mr. Smith's colour is twenty-five percent!", "mister smith is color is 25%"),
    ("Ten thousand and one", "10001"),
    ("It's the 21st century, isn't it?", "it is the 21st century is not it"),
    ("I won't pay $3.50 for 1st-class mail.", "i will not pay $3.50 for 1st class mail"),
    ("I have 1 dog", "i have one dog"),  # whisper writes a lone "1" as "one"
    # punctuation and casing
    ("HELLO,   World!", "hello world"),
    # contractions expanded
    ("They're here; we've seen them.", "they are here we have seen them"),
    # fillers dropped, bracketed / parenthesised spans removed, titles spelled out
    ("Um, uh, hello hmm", "hello"),
    ("Dr. Who [laughs] (inaudible) okay", "doctor who okay"),
    # British -> American spelling
    ("The grey colour of the theatre", "the gray color of the theater"),
]

OTHER_GOLDEN = [
    ("Ça, c'est TRÈS bien !", "fr", "ça c est très bien"),
    ("Straße und Brücke.", "de", "straße und brücke"),
    ("Привет, Мир!", "ru", "привет мир"),
    ("안녕하세요, 반갑습니다!", "ko", "안녕하세요 반갑습니다"),
    ("Él dijo: «¿Qué?»", "es", "él dijo qué"),
]


@pytest.mark.parametrize("text, expected", ENGLISH_GOLDEN)
def test_english_normaliser(text, expected):
    assert normalize_for_wer(text, "en") == expected


@pytest.mark.parametrize("text, language, expected", OTHER_GOLDEN)
def test_basic_normaliser_for_other_languages(text, language, expected):
    assert normalize_for_wer(text, language) == expected


def test_language_selection_and_options():
    assert is_english(None) and is_english("en") and is_english("EN-us") and not is_english("de")
    # spelled-out numbers are an English rule: the basic normaliser leaves them alone
    assert normalize_for_wer("twenty five", "de") == "twenty five"
    assert normalize_for_wer("twenty five", "en") == "25"
    assert normalize_for_wer("Très bien", "fr", remove_diacritics=True) == "tres bien"
    with pytest.raises(ValueError, match="got None"):
        normalize_for_wer(None, "en")


def test_normalisation_makes_equivalent_transcripts_score_zero():
    ref = normalize_for_wer("Mr. Smith paid twenty-five dollars, didn't he?", "en")
    hyp = normalize_for_wer("mister smith paid $25 did not he", "en")
    assert word_errors(ref, hyp).errors == 0
