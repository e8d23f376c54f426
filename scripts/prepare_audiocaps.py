#!/usr/bin/env python
"""AudioCaps-style CSV -> Audex text-to-audio (TTA) and captioning manifests.

The CSV has a header with an id column, a caption column and the columns that name the audio file
(AudioCaps: ``audiocap_id,youtube_id,start_time,caption``). ``--audio-pattern`` builds the file name from any
columns, e.g. ``"{audiocap_id}.wav"`` (default) or ``"{youtube_id}_{start_time}.wav"``.

* ``tta``: caption in, audio codes out (cut ``<id>_tta``; run ``scripts/pretokenize.py`` next, which pads or
  crops the clip to the fixed 10 s);
* ``caption``: audio question answering with the question "Describe the audio" and the caption as the
  answer (cut ``<id>_caption``).

    python scripts/prepare_audiocaps.py audiocaps/train.csv --audio-dir audiocaps/audio --tasks tta,caption \\
        -o manifests/audiocaps_train.jsonl.gz
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Iterator

from lhotse.cut import Cut

from audex.data import schema
from audex.data.prepare import add_output_args, comma_separated, probed, write_manifest
from audex.data.skips import MISSING_FIELD, SkipSample
from audex.prompts import CAPTION_PROMPT

TTA, CAPTION = "tta", "caption"
TASKS = (TTA, CAPTION)


def iter_cuts(args) -> Iterator[Cut | SkipSample]:
    with args.csv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (args.id_column, args.caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{args.csv}: no column(s) {missing}; the header is {reader.fieldnames}")
        for row_no, row in enumerate(reader, 2):
            ex_id = (row.get(args.id_column) or "").strip() or f"row{row_no}"
            caption = (row.get(args.caption_column) or "").strip()
            if not caption:
                yield SkipSample(MISSING_FIELD, f"line {row_no}: empty caption", cut_id=ex_id)
                continue
            try:
                audio = args.audio_dir / args.audio_pattern.format(**row)
            except KeyError as e:
                raise SystemExit(f"--audio-pattern {args.audio_pattern!r} names column {e}, which {args.csv} lacks "
                                 f"(columns: {reader.fieldnames})") from None
            rec = probed(audio, ex_id, recording_id=ex_id)
            if isinstance(rec, SkipSample):
                yield rec
                continue
            if TTA in args.tasks:
                yield schema.make_tta_cut(caption, audio=rec, cut_id=f"{ex_id}_tta")
            if CAPTION in args.tasks:
                yield schema.make_audio_qa_cut(rec, CAPTION_PROMPT, caption, cut_id=f"{ex_id}_caption")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--audio-dir", type=Path, required=True)
    parser.add_argument("--audio-pattern", default="{audiocap_id}.wav", help="audio file name from the row's columns")
    parser.add_argument("--id-column", default="audiocap_id")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--tasks", type=comma_separated(TASKS), default=TASKS, help="tta, caption or tta,caption")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"{args.csv} does not exist")
    return write_manifest(iter_cuts(args), args.output, "prepare_audiocaps", args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
