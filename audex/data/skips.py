"""Bad-input accounting: every dropped example has a reason, a count and a log line.

A data pipeline that meets a missing audio file, a corrupt one, an empty one, invalid base64, codec codes
out of range, a transcript longer than the context or an unknown task name must neither crash the run nor
drop the example silently. The code that detects the problem raises :class:`SkipSample` with one of the
reasons below; the loop that drives it hands the exception to a :class:`SkipCounter`, which counts it per
reason, logs the first few occurrences of each reason in full, prints a per-reason summary (at the end of an
epoch or of a preparation script) and turns a skip rate above ``max_skip_rate`` into a
:class:`TooManySkipsError` that says what went wrong.

Example::

    >>> counter = SkipCounter("train", max_skip_rate=0.5)
    >>> for cut in cuts:
    ...     seq = counter.run(builder, cut)      # None when the cut was skipped
    ...     if seq is not None:
    ...         batch.append(seq)
    >>> counter.log_summary()                     # "train: 998 kept, 2 skipped (0.20 %): missing_audio=2"

No library offers this (lhotse and NeMo drop bad cuts with at most a log line), hence a small module.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, TypeVar

logger = logging.getLogger("audex.data")

T = TypeVar("T")

# ---- reasons ------------------------------------------------------------------------------------
MISSING_AUDIO = "missing_audio"
CORRUPT_AUDIO = "corrupt_audio"
ZERO_LENGTH_AUDIO = "zero_length_audio"
INVALID_SEGMENT = "invalid_segment"
INVALID_BASE64 = "invalid_base64"
CODES_OUT_OF_RANGE = "codes_out_of_range"
INVALID_CODEC_CODES = "invalid_codec_codes"
TOO_LONG_FOR_CONTEXT = "too_long_for_context"
UNKNOWN_TASK = "unknown_task"
MISSING_FIELD = "missing_field"
INVALID_MESSAGES = "invalid_messages"
AUDIO_PLACEHOLDER_MISMATCH = "audio_placeholder_mismatch"
# filters of the paper (section 4.1): counted, but these are choices, not bad input
AUDIO_TOO_SHORT = "audio_too_short"
AUDIO_TOO_LONG = "audio_too_long"
TEXT_TOO_LONG = "text_too_long"

#: reason -> what to do about it (printed in error messages and summaries)
SKIP_REASONS: dict[str, str] = {
    MISSING_AUDIO: "the audio file does not exist: fix the path in the manifest or re-run the preparation script",
    CORRUPT_AUDIO: "the audio file cannot be decoded: re-download or re-encode it",
    ZERO_LENGTH_AUDIO: "the audio has no samples: drop it from the corpus",
    INVALID_SEGMENT: "the offset/duration does not fit inside the audio file: fix the row",
    INVALID_BASE64: "the pre-tokenised codec codes are not valid base64: re-run scripts/pretokenize.py",
    CODES_OUT_OF_RANGE: "codec codes exceed the codebook of the model's vocabulary: pre-tokenise with the "
                        "codec that matches the model config",
    INVALID_CODEC_CODES: "the codec codes have the wrong shape or length: re-run scripts/pretokenize.py",
    TOO_LONG_FOR_CONTEXT: "the example has more tokens than the context: raise max_length or drop long examples",
    UNKNOWN_TASK: "custom['task'] is not one of asr, ast, tts, tta, audio_qa, text: fix the manifest",
    MISSING_FIELD: "a field the task needs is missing: see audex.data.schema for the required fields",
    INVALID_MESSAGES: "custom['messages'] is not a valid chat: see audex.data.schema.make_text_cut",
    AUDIO_PLACEHOLDER_MISMATCH: "the number of <sound> tokens differs from the number of audios, or the text "
                                "contains audio-placeholder tokens",
    AUDIO_TOO_SHORT: "filtered: audio shorter than the paper's minimum",
    AUDIO_TOO_LONG: "filtered: audio longer than the paper's maximum",
    TEXT_TOO_LONG: "filtered: text example over the paper's token limit",
}
#: the reasons that are the paper's filters: counted apart from bad input (never against ``max_skip_rate``)
FILTER_REASONS = frozenset({AUDIO_TOO_SHORT, AUDIO_TOO_LONG, TEXT_TOO_LONG})
#: one skip as it travels from a dataloader worker to the training process: (reason, detail, cut id)
SkipRecord = tuple[str, str, "str | None"]


class SkipSample(Exception):
    """An example that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`.

    Example::

        >>> raise SkipSample(MISSING_AUDIO, "/data/a.flac does not exist", cut_id="a")
    """

    def __init__(self, reason: str, detail: str = "", cut_id: str | None = None):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known reasons: {sorted(SKIP_REASONS)}")
        self.reason = reason
        self.detail = detail
        self.cut_id = cut_id
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"cut {self.cut_id!r}: " if self.cut_id else ""
        return f"{where}{self.reason}: {self.detail}" if self.detail else f"{where}{self.reason}"

    def with_cut_id(self, cut_id: str) -> "SkipSample":
        if self.cut_id is None:
            self.cut_id = cut_id
            self.args = (self._message(),)
        return self


class TooManySkipsError(RuntimeError):
    """Raised when the share of skipped examples exceeds ``max_skip_rate``."""


class SkipCounter:
    """Counts skipped examples per reason; logs them; raises when the skip rate is too high.

    Args:
        name: what is counted (``"train"``, ``"prepare_librispeech"``), used in every message.
        max_skip_rate: share of skipped examples (0..1) that raises :class:`TooManySkipsError`; None: never.
        min_examples: the rate is checked during the run only after this many examples (a few early
            failures of a large corpus are not a reason to stop); :meth:`check` with ``final=True`` checks always.
        log_first: full log lines per reason; later ones are counted silently until the summary.

    Example::

        >>> c = SkipCounter("demo", max_skip_rate=0.2, min_examples=1)
        >>> c.accept(); c.skip(SkipSample(MISSING_AUDIO, "x.flac", cut_id="x"))
        Traceback (most recent call last):
        TooManySkipsError: demo: 1 of 2 examples (50.00 %) were skipped, above max_skip_rate=0.2 ...
    """

    def __init__(self, name: str = "data", max_skip_rate: float | None = None, min_examples: int = 100,
                 log_first: int = 5):
        if max_skip_rate is not None and not 0.0 <= max_skip_rate <= 1.0:
            raise ValueError(f"max_skip_rate must lie in [0, 1] (a share of examples), got {max_skip_rate}")
        self.name = name
        self.max_skip_rate = max_skip_rate
        self.min_examples = int(min_examples)
        self.log_first = int(log_first)
        self.kept = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    # ---- counting ------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    @property
    def seen(self) -> int:
        return self.kept + self.skipped

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.seen if self.seen else 0.0

    def accept(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, error: SkipSample | str, cut_id: str | None = None, detail: str = "") -> None:
        """Count one skipped example (a :class:`SkipSample` or a reason string) and log it."""
        if isinstance(error, str):
            error = SkipSample(error, detail, cut_id)
        elif cut_id is not None:
            error.with_cut_id(cut_id)
        self.counts[error.reason] += 1
        self.examples.setdefault(error.reason, str(error))
        n = self.counts[error.reason]
        if n <= self.log_first:
            more = " (further ones are counted silently until the summary)" if n == self.log_first else ""
            logger.warning("%s: skipped %s%s", self.name, error, more)
        self.check(final=False)

    def run(self, fn: Callable[[Any], T], item: Any) -> T | None:
        """``fn(item)``, counting a :class:`SkipSample` it raises as a skip (None is returned then)."""
        try:
            out = fn(item)
        except SkipSample as e:
            self.skip(e, cut_id=getattr(item, "id", None))
            return None
        self.accept()
        return out

    def merge(self, other: "SkipCounter") -> "SkipCounter":
        """Add another counter's counts (e.g. from dataloader workers)."""
        self.kept += other.kept
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)
        return self

    def reset(self) -> None:
        self.kept = 0
        self.counts.clear()
        self.examples.clear()

    # ---- reporting -----------------------------------------------------------------------------
    def summary(self) -> str:
        per_reason = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        head = f"{self.name}: {self.kept} kept, {self.skipped} skipped ({100 * self.skip_rate:.2f} %)"
        return f"{head}: {per_reason}" if per_reason else head

    def summary_lines(self) -> list[str]:
        """The summary, then one line per reason: count, first example, what to do."""
        lines = [self.summary()]
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}  e.g. {self.examples[reason]}  -> {SKIP_REASONS[reason]}")
        return lines

    def log_summary(self, level: int = logging.INFO) -> str:
        text = "\n".join(self.summary_lines())
        logger.log(level if not self.skipped else max(level, logging.WARNING), text)
        return text

    def check(self, final: bool = True) -> None:
        """Raise :class:`TooManySkipsError` when the skip rate exceeds ``max_skip_rate``."""
        if self.max_skip_rate is None or not self.seen:
            return
        if not final and self.seen < self.min_examples:
            return
        if self.skip_rate > self.max_skip_rate:
            raise TooManySkipsError(
                f"{self.name}: {self.skipped} of {self.seen} examples ({100 * self.skip_rate:.2f} %) were skipped, "
                f"above max_skip_rate={self.max_skip_rate}.\n" + "\n".join(self.summary_lines()[1:]) +
                "\nFix the data (see the reasons above) or raise max_skip_rate if these losses are expected."
            )

    def to_dict(self) -> dict:
        return {"name": self.name, "kept": self.kept, "skipped": dict(self.counts)}


# ---- across processes ------------------------------------------------------------------------------
class SkipEvents:
    """Skips recorded in this process, waiting for a chunk or batch to carry them to the training process.

    It has the ``accept``/``skip`` methods of :class:`SkipCounter`, so it can stand in for one
    (e.g. as the counter of :class:`~audex.data.filters.PaperFilters`); the counting itself happens once, in
    the loader of the training process, from the records that :meth:`drain` hands out.
    """

    def __init__(self):
        self._records: list[SkipRecord] = []

    def accept(self, n: int = 1) -> None:
        """Kept examples are counted from the batches; nothing to record."""

    def skip(self, error: SkipSample | str, cut_id: str | None = None, detail: str = "") -> None:
        if isinstance(error, str):
            error = SkipSample(error, detail, cut_id)
        self._records.append((error.reason, error.detail, error.cut_id if error.cut_id is not None else cut_id))

    def drain(self) -> list[SkipRecord]:
        records, self._records = self._records, []
        return records

    def __len__(self) -> int:
        return len(self._records)

    def __getstate__(self):  # a copy sent to a worker starts empty: records are drained where they were made
        return {"_records": []}


class LoaderSkips:
    """What a data loader does with the skip records its batches carry, in the training process: bad input is
    counted in ``skips`` (checked against ``max_skip_rate``), the paper's filters in ``filtered`` (choices, not
    errors, never checked), both with per-reason summaries.

    Example::

        >>> acc = LoaderSkips("train data", max_skip_rate=0.05)
        >>> acc.account(batch.skipped + sampler_events.drain(), kept=batch.num_samples)
        >>> acc.check()                              # at the end of a pass: TooManySkipsError above 5 %
    """

    def __init__(self, name: str, max_skip_rate: float | None = None, min_examples: int = 100):
        self.skips = SkipCounter(name, max_skip_rate=max_skip_rate, min_examples=min_examples)
        self.filtered = SkipCounter(f"{name} filters")

    def reset(self) -> None:
        self.skips.reset()
        self.filtered.reset()

    def account(self, records: list[SkipRecord], kept: int) -> None:
        """Count ``records`` and ``kept`` examples (a filtered example was seen by the filters but not kept)."""
        bad = 0
        for reason, detail, cut_id in records:
            if reason in FILTER_REASONS:
                self.filtered.skip(reason, cut_id=cut_id, detail=detail)
            else:
                bad += 1
                self.skips.skip(reason, cut_id=cut_id, detail=detail)
        self.skips.accept(kept)
        self.filtered.accept(kept + bad)

    def check(self) -> None:
        """The end-of-pass check of the skip rate (:meth:`SkipCounter.check`)."""
        self.skips.check(final=True)

    def log_summary(self) -> str:
        text = self.skips.log_summary()
        if self.filtered.skipped:
            text += "\n" + self.filtered.log_summary()
        return text
