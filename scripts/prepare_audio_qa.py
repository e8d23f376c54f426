#!/usr/bin/env python
"""JSONL of audio question answering -> an Audex audio-QA manifest.

One JSON object per line::

    {"audio": "clips/a.wav", "question": "Where is the conversation likely taking place?",
     "answer": "In a train station.", "id": "q1", "offset": 0.0, "duration": 12.5}

``audio`` is relative to ``--audio-dir`` (default: the JSONL's folder); ``id``, ``offset`` and ``duration``
are optional (default id: ``<audio stem>_<line number>``). A ``<sound>`` written into the question (as in
Audio Flamingo data) is removed: the prompt format places the audio (``<sound>\\n{question}``). Rows with
missing or unreadable audio, bad offsets or missing fields are skipped and counted.

    python scripts/prepare_audio_qa.py data/clotho_aqa.jsonl -o manifests/clotho_aqa.jsonl.gz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

from lhotse.cut import Cut

from audex.data import schema
from audex.data.prepare import add_output_args, probed, write_manifest
from audex.data.skips import INVALID_SEGMENT, MISSING_FIELD, SkipSample
from audex.vocab import SOUND


def strip_sound(question: str) -> str:
    """The question without literal ``<sound>`` placeholders (and the line break next to them)."""
    return "\n".join(line for line in question.replace(SOUND, "\n").split("\n") if line.strip()).strip()


def _segment(cut: Cut, offset, duration) -> Cut:
    offset = float(offset or 0.0)
    duration = float(duration) if duration is not None else cut.duration - offset
    if offset < 0 or duration <= 0 or offset + duration > cut.duration + 1e-3:
        raise ValueError(f"offset {offset} + duration {duration} does not fit in {cut.duration:.3f} s")
    return cut.truncate(offset=offset, duration=min(duration, cut.duration - offset))


def iter_cuts(jsonl: Path, audio_dir: Path) -> Iterator[Cut | SkipSample]:
    with jsonl.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield SkipSample(MISSING_FIELD, f"line {line_no} is not JSON ({e})", cut_id=f"line{line_no}")
                continue
            if not isinstance(row, dict):
                yield SkipSample(MISSING_FIELD, f"line {line_no} is not a JSON object", cut_id=f"line{line_no}")
                continue
            audio_rel = row.get("audio")
            ex_id = str(row.get("id") or f"{Path(str(audio_rel or 'line')).stem}_{line_no}")
            question = strip_sound(row.get("question") or "")
            answer = (row.get("answer") or "").strip()
            if not audio_rel or not question or not answer:
                absent = [k for k, v in (("audio", audio_rel), ("question", question), ("answer", answer)) if not v]
                yield SkipSample(MISSING_FIELD, f"line {line_no} lacks {absent}", cut_id=ex_id)
                continue
            rec = probed(audio_dir / audio_rel, ex_id)
            if isinstance(rec, SkipSample):
                yield rec
                continue
            cut = rec.to_cut()
            if row.get("offset") is not None or row.get("duration") is not None:
                try:
                    cut = _segment(cut, row.get("offset"), row.get("duration"))
                except ValueError as e:
                    yield SkipSample(INVALID_SEGMENT, f"line {line_no}: {e} ({audio_rel})", cut_id=ex_id)
                    continue
            yield schema.make_audio_qa_cut(cut, question, answer, cut_id=ex_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", type=Path)
    parser.add_argument("--audio-dir", type=Path, help="folder the audio paths are relative to (default: the JSONL's)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.jsonl.is_file():
        parser.error(f"{args.jsonl} does not exist")
    return write_manifest(iter_cuts(args.jsonl, args.audio_dir or args.jsonl.parent), args.output,
                          "prepare_audio_qa", args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
