#!/usr/bin/env python
"""LibriSpeech-style folders -> an Audex ASR (and optionally TTS) manifest.

Layout: ``CORPUS/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` plus one
``<speaker>-<chapter>.trans.txt`` per chapter with lines ``<utt id> <TRANSCRIPT>``. Every utterance becomes
an ASR cut ``<utt id>_asr`` (language ``--language``, default ``en``); with ``--tasks asr,tts`` also a TTS
cut ``<utt id>_tts`` (the paper trains TTS on clean ASR samples too; pre-tokenise it with
``scripts/pretokenize.py``). Transcripts are kept as written.

    python scripts/prepare_librispeech.py /data/LibriSpeech/train-clean-100 -o manifests/ls100.jsonl.gz

Missing, unreadable or empty audio and empty transcripts are skipped and counted; the summary is printed
at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from lhotse.cut import Cut

from audex.data import schema
from audex.data.prepare import add_output_args, comma_separated, probe_recording, write_manifest
from audex.data.skips import MISSING_FIELD, SkipSample

AUDIO_EXTENSIONS = (".flac", ".wav")
TASKS = (schema.ASR, schema.TTS)


def iter_cuts(corpus: Path, tasks: tuple[str, ...], language: str) -> Iterator[Cut | SkipSample]:
    transcripts = sorted(corpus.rglob("*.trans.txt"))
    for trans in transcripts:
        for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if not text.strip():
                yield SkipSample(MISSING_FIELD, f"{trans}:{line_no} has no transcript", cut_id=utt_id)
                continue
            audio = next((trans.parent / f"{utt_id}{ext}" for ext in AUDIO_EXTENSIONS
                          if (trans.parent / f"{utt_id}{ext}").is_file()), trans.parent / f"{utt_id}.flac")
            try:
                rec = probe_recording(audio, recording_id=utt_id)
            except SkipSample as e:
                yield e.with_cut_id(utt_id)
                continue
            for task in tasks:
                if task == schema.ASR:
                    yield schema.make_asr_cut(rec, text.strip(), language, cut_id=f"{utt_id}_asr")
                else:
                    yield schema.make_tts_cut(text.strip(), audio=rec, language=language, cut_id=f"{utt_id}_tts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="folder holding <speaker>/<chapter>/ subfolders")
    parser.add_argument("--tasks", type=comma_separated(TASKS), default=(schema.ASR,), help="asr, tts or asr,tts (default asr)")
    parser.add_argument("--language", default="en", help="language id written into the ASR target (default en)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.corpus.is_dir():
        parser.error(f"{args.corpus} is not a folder")
    return write_manifest(iter_cuts(args.corpus, args.tasks, args.language), args.output, "prepare_librispeech",
                          args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
