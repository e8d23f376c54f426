"""The paper's data filters (section 4.1), as configuration, with counts.

* TTS: speech between 0.1 and 120 s;
* audio understanding (audio QA, and the other audio-input tasks ASR and AST): audio between 0.1 and 900 s;
* text SFT: examples over 200K tokens are dropped.

TTA has no duration filter: its target is fixed to 10 s (cropped/padded at pre-tokenisation). Every
dropped example is counted per reason (``audio_too_short``, ``audio_too_long``, ``text_too_long``) in a
:class:`~audex.data.skips.SkipCounter` whose summary the pipeline logs; filters are choices, not errors, so
that counter has no maximum rate.

Example::

    >>> keep = PaperFilters(PaperFilterConfig(), tokenizer=tokenizer)
    >>> cuts = cuts.filter(keep)          # lazily, in Lhotse
    >>> keep.counter.log_summary()        # "filters: 9,981 kept, 19 skipped: audio_too_long=12, ..."

Counts made inside dataloader worker processes stay in those processes (each worker has its own copy of
the filter); run the filter in the main process, or merge the workers' counters, for global numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lhotse.cut import Cut

from audex.data import schema
from audex.data.skips import AUDIO_TOO_LONG, AUDIO_TOO_SHORT, TEXT_TOO_LONG, SkipCounter


@dataclass(frozen=True)
class PaperFilterConfig:
    """Duration bounds in seconds and the text-token limit; None disables a bound."""

    tts_min_seconds: float | None = 0.1
    tts_max_seconds: float | None = 120.0
    understanding_min_seconds: float | None = 0.1
    understanding_max_seconds: float | None = 900.0
    text_max_tokens: int | None = 200_000


class PaperFilters:
    """Predicate for ``CutSet.filter``: True keeps the cut; a dropped cut is counted with its reason.

    Args:
        config: the bounds (the paper's numbers by default).
        tokenizer: counts the tokens of text chats (needed unless ``config.text_max_tokens`` is None).
        counter: where drops are counted (a fresh ``SkipCounter("filters")`` by default).
    """

    def __init__(self, config: PaperFilterConfig = PaperFilterConfig(), tokenizer=None,
                 counter: SkipCounter | None = None):
        if config.text_max_tokens is not None and tokenizer is None:
            raise ValueError("PaperFilters needs a tokenizer to apply text_max_tokens="
                             f"{config.text_max_tokens}; pass one or set text_max_tokens to None")
        self.config = config
        self.tokenizer = tokenizer
        self.counter = counter if counter is not None else SkipCounter("filters")

    def reason(self, cut: Cut) -> str | None:
        """Why the cut is dropped, or None to keep it. Cuts with a missing/unknown task pass through: the
        sequence builder counts those as bad input."""
        cfg = self.config
        task = (cut.custom or {}).get("task")
        if task == schema.TTS:
            return _duration_reason(cut.duration, cfg.tts_min_seconds, cfg.tts_max_seconds)
        if task in schema.AUDIO_INPUT_TASKS:
            if not cut.has_recording:  # bad input, not a filter decision: the builder counts it (missing_field)
                return None
            return _duration_reason(cut.duration, cfg.understanding_min_seconds, cfg.understanding_max_seconds)
        if task == schema.TEXT and cfg.text_max_tokens is not None:
            if self.num_text_tokens(cut) > cfg.text_max_tokens:
                return TEXT_TOO_LONG
        return None

    def num_text_tokens(self, cut: Cut) -> int:
        """Tokens of the chat's contents and reasoning (template tokens excluded: a few per turn)."""
        messages = (cut.custom or {}).get("messages") or []
        encode = self.tokenizer.encode
        return sum(len(encode(m.get("content") or "")) + len(encode(m.get("thinking") or ""))
                   for m in messages if isinstance(m, dict))

    def __call__(self, cut: Cut) -> bool:
        reason = self.reason(cut)
        if reason is None:
            self.counter.accept()
            return True
        self.counter.skip(reason, cut_id=cut.id, detail=self._detail(cut, reason))
        return False

    def _detail(self, cut: Cut, reason: str) -> str:
        if reason == TEXT_TOO_LONG:
            return f"over {self.config.text_max_tokens} tokens"
        return f"{cut.duration:.3f} s ({cut.custom.get('task')})"


def _duration_reason(duration: float, low: float | None, high: float | None) -> str | None:
    if low is not None and duration < low:
        return AUDIO_TOO_SHORT
    if high is not None and duration > high:
        return AUDIO_TOO_LONG
    return None
