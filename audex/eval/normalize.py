"""Text normalisation before WER, as the Open ASR leaderboard does it (appendix A.7).

* English: whisper-normalizer's ``EnglishTextNormalizer`` — the leaderboard's "official English normalization
  pipeline" (lower case, punctuation removed, British -> American spelling, spelled-out numbers -> digits,
  contractions expanded, fillers such as "uh"/"um" dropped, "mr." -> "mister").
* Every other language: whisper-normalizer's ``BasicTextNormalizer`` (lower case, bracketed and parenthesised
  spans removed, Unicode marks/symbols/punctuation -> spaces). The leaderboard's multilingual normaliser is this
  same class followed by a ``[^\\w\\s]`` strip and a whitespace collapse; ``BasicTextNormalizer`` already turns
  every Unicode punctuation and symbol into a space, so we only collapse whitespace.

Example::

    >>> normalize_for_wer("Mr. Smith's colour is twenty-five percent!", "en")
    'mister smith is color is 25%'
    >>> normalize_for_wer("Ça, c'est TRÈS bien !", "fr")
    'ça c est très bien'
"""

from __future__ import annotations

import re
from functools import lru_cache

from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

ENGLISH_CODES = frozenset({"en", "eng", "english", "en-us", "en_us", "en-gb", "en_gb"})
_WHITESPACE = re.compile(r"\s+")


def is_english(language: str | None) -> bool:
    """``None`` counts as English: the English benchmarks (Open ASR, noisy LibriSpeech) carry no language id."""
    return language is None or str(language).strip().lower() in ENGLISH_CODES


@lru_cache(maxsize=None)
def _english():
    return EnglishTextNormalizer()


@lru_cache(maxsize=None)
def _basic(remove_diacritics: bool):
    return BasicTextNormalizer(remove_diacritics=remove_diacritics)


def normalize_for_wer(text: str, language: str | None = "en", remove_diacritics: bool = False) -> str:
    """Normalised text for WER scoring; the same function must be applied to reference and hypothesis.

    Args:
        text: a transcript or a model's output.
        language: ISO code ("en", "de", ...); English (or ``None``) selects the English normaliser.
        remove_diacritics: for non-English text, strip accents too ("très" -> "tres"); off by default, as in
            the leaderboard's multilingual setting.
    """
    if text is None:
        raise ValueError("normalize_for_wer got None instead of a string: give the transcript text")
    norm = _english() if is_english(language) else _basic(bool(remove_diacritics))
    return _WHITESPACE.sub(" ", norm(str(text))).strip()
