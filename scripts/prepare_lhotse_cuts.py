#!/usr/bin/env python
"""A Lhotse recipe's output (or any Lhotse CutSet) -> an Audex manifest with the task's fields filled in.

Training reads a recipe's cuts as they are, with ``tags`` on the ``input_cfg`` item (README "Your own data").
This script writes those tags into the manifest instead, for the steps that read a manifest on their own:
``scripts/pretokenize.py`` (TTS/TTA targets from clean speech or sound), evaluation (the AST suite reads
``custom["translation"]``), or Shar export. Input is a CutSet, or the recordings + supervisions that
``lhotse prepare <recipe>`` writes; each supervision becomes one cut (``trim_to_supervisions``), named by
the supervision id.

    lhotse prepare libritts LibriTTS/ manifests/
    python scripts/prepare_lhotse_cuts.py --recordings manifests/libritts_recordings_train-clean-100.jsonl.gz \\
        --supervisions manifests/libritts_supervisions_train-clean-100.jsonl.gz --task tts --language en \\
        -o manifests/libritts_tts.jsonl.gz
    python scripts/pretokenize.py manifests/libritts_tts.jsonl.gz -o manifests/libritts_tts_codes.jsonl.gz ...

The options are the ``tags`` of :mod:`audex.data.sources` (``--language``, ``--translation-field``,
``--caption-field``, ``--question-field``, ``--answer-field``, a fixed ``--question``). Cuts whose audio file
is missing or whose task fields are missing or empty are counted skips with their reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from lhotse import CutSet, RecordingSet, SupervisionSet
from lhotse.cut import Cut

from audex.data import schema
from audex.data.prepare import add_output_args, write_manifest
from audex.data.skips import MISSING_AUDIO, SkipSample
from audex.data.sources import FIELD_TAGS, adapt_cut

TASKS = (schema.ASR, schema.AST, schema.AUDIO_QA, schema.TTS, schema.TTA)
#: accessors of :mod:`audex.data.schema` that a cut of each task must pass (each raises SkipSample)
REQUIRED = {schema.ASR: (schema.get_transcript, schema.get_language),
            schema.AST: (schema.get_transcript, schema.get_language, schema.get_translation),
            schema.AUDIO_QA: (schema.get_question, schema.get_answer),
            schema.TTS: (schema.get_transcript,),
            schema.TTA: (schema.get_caption,)}


def read_cuts(args) -> CutSet:
    if args.cuts is not None:
        return CutSet.from_file(args.cuts)
    if args.recordings is None or args.supervisions is None:
        raise SystemExit("give a CutSet, or --recordings and --supervisions (a recipe's output)")
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_file(args.recordings),
                                 supervisions=SupervisionSet.from_file(args.supervisions))
    return cuts.trim_to_supervisions(keep_overlapping=False)


def to_audex(cut: Cut, task: str, tags: dict) -> Cut:
    """The cut with ``task`` and the tags applied; raises :class:`SkipSample` when the task cannot use it."""
    cut.custom = {**(cut.custom or {}), **tags, "task": task}
    cut = adapt_cut(cut)
    if cut.has_recording:
        for src in cut.recording.sources:
            if src.type == "file" and not Path(src.source).is_file():
                raise SkipSample(MISSING_AUDIO, f"{src.source} does not exist", cut.id)
    elif task in schema.AUDIO_INPUT_TASKS:
        raise SkipSample(MISSING_AUDIO, "the cut has no recording", cut.id)
    if len(cut.supervisions) > 1:
        cut.supervisions = cut.supervisions[:1]
    for accessor in REQUIRED[task]:
        try:
            accessor(cut)
        except SkipSample as e:
            raise e.with_cut_id(cut.id)
    return cut


def iter_cuts(cuts: CutSet, task: str, tags: dict) -> Iterator[Cut | SkipSample]:
    for cut in cuts:
        try:
            yield to_audex(cut, task, tags)
        except SkipSample as e:
            yield e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cuts", type=Path, nargs="?", help="a Lhotse CutSet (.jsonl/.jsonl.gz)")
    parser.add_argument("--recordings", type=Path, help="a recipe's RecordingSet (instead of a CutSet)")
    parser.add_argument("--supervisions", type=Path, help="a recipe's SupervisionSet (with --recordings)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--language", help="language of every cut (recipes write names such as 'English')")
    for tag in FIELD_TAGS:
        parser.add_argument(f"--{tag.replace('_', '-')}", dest=tag,
                            help=f"the field holding custom[{FIELD_TAGS[tag]!r}] (custom key, supervision key, or text)")
    parser.add_argument("--question", help="audio_qa: one question for every cut")
    add_output_args(parser)
    args = parser.parse_args(argv)
    tags = {k: getattr(args, k) for k in ("language", *FIELD_TAGS, "question") if getattr(args, k) is not None}
    return write_manifest(iter_cuts(read_cuts(args), args.task, tags), args.output, "prepare_lhotse_cuts",
                          args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
