"""What every ``scripts/prepare_*.py`` shares: probing audio files, writing a manifest, the skip summary.

A preparation script is a generator of cuts (:mod:`audex.data.schema`) that yields a
:class:`~audex.data.skips.SkipSample` instead of a cut for a row it cannot use; :func:`write_manifest`
writes the cuts with Lhotse's sequential JSONL writer, counts the skips per reason, prints the summary and
returns the exit status (1 when the skip rate exceeds ``--max-skip-rate``).

Example::

    def rows_to_cuts(...):
        for row in rows:
            rec = probed(row["path"], row["id"])
            if isinstance(rec, SkipSample):
                yield rec
                continue
            yield make_asr_cut(rec, row["text"], "en", cut_id=row["id"])

    return write_manifest(rows_to_cuts(...), args.output, "prepare_x", args.max_skip_rate)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable

from lhotse import CutSet, Recording
from lhotse.cut import Cut

from audex.data.skips import (
    CORRUPT_AUDIO,
    MISSING_AUDIO,
    ZERO_LENGTH_AUDIO,
    SkipCounter,
    SkipSample,
    TooManySkipsError,
)


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", required=True, type=Path,
                        help="manifest to write (.jsonl or .jsonl.gz); export to Shar with `lhotse shar export`")
    parser.add_argument("--max-skip-rate", type=float, default=0.05,
                        help="exit with status 1 when more than this share of rows was skipped (default 0.05)")


def comma_separated(choices: tuple[str, ...]):
    """argparse ``type`` for a comma-separated subset of ``choices`` (e.g. ``--tasks asr,tts``)."""

    def parse(value: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
        bad = [v for v in items if v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}; got {value!r}")
        return items

    return parse


def probe_recording(path: str | Path, recording_id: str | None = None) -> Recording:
    """A :class:`~lhotse.Recording` for an audio file (header only); bad files raise :class:`SkipSample`."""
    path = Path(path)
    if not path.is_file():
        raise SkipSample(MISSING_AUDIO, f"{path} does not exist")
    try:
        rec = Recording.from_file(path, recording_id=recording_id)
    except Exception as e:  # lhotse tries every audio backend and raises its own error type
        raise SkipSample(CORRUPT_AUDIO, f"{path}: {str(e).splitlines()[0][:200]}") from None
    if rec.num_samples == 0:
        raise SkipSample(ZERO_LENGTH_AUDIO, f"{path} has no samples")
    return rec


def probed(path: str | Path, cut_id: str, recording_id: str | None = None) -> Recording | SkipSample:
    """:func:`probe_recording`, or the :class:`SkipSample` naming why not (tagged with ``cut_id``) for a
    preparation generator to yield in place of the cut."""
    try:
        return probe_recording(path, recording_id=recording_id)
    except SkipSample as e:
        return e.with_cut_id(cut_id)


def write_manifest(items: Iterable[Cut | SkipSample], output: str | Path, name: str,
                   max_skip_rate: float | None = 0.05, out=None) -> int:
    """Write the cuts, count the skips, print the per-reason summary; 0 = success, 1 = too many skips."""
    output = Path(output)
    out = out or sys.stdout
    output.parent.mkdir(parents=True, exist_ok=True)
    counter = preparation_counter(name, max_skip_rate)
    with CutSet.open_writer(output) as writer:
        for item in items:
            if isinstance(item, SkipSample):
                counter.skip(item)
            else:
                writer.write(item)
                counter.accept()
    if counter.seen == 0:
        print(f"ERROR: {name} found no examples: check the input paths and column names", file=out)
        return 1
    return report(counter, f"wrote {counter.kept} cuts to {output}", out)


def preparation_counter(name: str, max_skip_rate: float | None) -> SkipCounter:
    """A counter whose rate is judged once, on the whole corpus (a few early failures must not stop a long
    preparation): :func:`report` checks it."""
    return SkipCounter(name, max_skip_rate=max_skip_rate, min_examples=sys.maxsize)


def report(counter: SkipCounter, result: str, out=None) -> int:
    """Print the per-reason summary and ``result``; 1 (with the error) when too many rows were skipped, else 0."""
    out = out or sys.stdout
    print("\n".join(counter.summary_lines()), file=out)
    print(result, file=out)
    try:
        counter.check(final=True)
    except TooManySkipsError as e:
        print(f"ERROR: {e}", file=out)
        return 1
    return 0
