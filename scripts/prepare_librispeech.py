#!/usr/bin/env python
"""LibriSpeech folders -> an Audex ASR (and optionally TTS) manifest, read by Lhotse's LibriSpeech recipe.

Layout: ``CORPUS/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` plus one
``<speaker>-<chapter>.trans.txt`` per chapter (``CORPUS`` is a part such as ``LibriSpeech/dev-clean``). Every
line is read by ``lhotse.recipes.librispeech.parse_utterance`` (the function behind ``lhotse prepare
librispeech``: the file of an utterance id, its Recording, its supervision with the speaker); every utterance
becomes an ASR cut ``<utt id>_asr`` (language ``--language``, default ``en``, in place of the recipe's
"English"); with ``--tasks asr,tts`` also a TTS cut ``<utt id>_tts`` (the paper trains TTS on clean ASR samples
too; pre-tokenise it with ``scripts/pretokenize.py``). Transcripts are kept as written.

    python scripts/prepare_librispeech.py /data/LibriSpeech/train-clean-100 -o manifests/ls100.jsonl.gz

What stays Audex's own: the recipe's ``prepare_librispeech`` stops at the first corrupt file or empty
transcript line and drops missing audio with a log line only; here each such line is a counted skip
(``corrupt_audio``, ``missing_field``, ``missing_audio``, ``zero_length_audio``) and the summary is printed at
the end. Any other Lhotse recipe's output trains as it is: see README "Your own data".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from lhotse.cut import Cut
from lhotse.recipes.librispeech import parse_utterance

from audex.data import schema
from audex.data.prepare import add_output_args, comma_separated, write_manifest
from audex.data.skips import CORRUPT_AUDIO, MISSING_AUDIO, MISSING_FIELD, ZERO_LENGTH_AUDIO, SkipSample

TASKS = (schema.ASR, schema.TTS)


def iter_cuts(corpus: Path, tasks: tuple[str, ...], language: str) -> Iterator[Cut | SkipSample]:
    for trans in sorted(corpus.rglob("*.trans.txt")):
        for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if not text.strip():
                yield SkipSample(MISSING_FIELD, f"{trans}:{line_no} has no transcript", cut_id=utt_id)
                continue
            try:
                parsed = parse_utterance(corpus, line, alignments={})
            except Exception as e:  # lhotse tries every audio backend and raises its own error type
                yield SkipSample(CORRUPT_AUDIO, f"{trans}:{line_no}: {str(e).splitlines()[0][:200]}", cut_id=utt_id)
                continue
            if parsed is None:
                where = corpus / Path(utt_id.replace("-", "/")).parent / f"{utt_id}.flac"
                yield SkipSample(MISSING_AUDIO, f"{where} does not exist", cut_id=utt_id)
                continue
            rec, sup = parsed
            if rec.num_samples == 0:
                yield SkipSample(ZERO_LENGTH_AUDIO, f"{rec.sources[0].source} has no samples", cut_id=utt_id)
                continue
            for task in tasks:
                if task == schema.ASR:
                    cut = schema.make_asr_cut(rec, sup.text, language, cut_id=f"{utt_id}_asr")
                else:
                    cut = schema.make_tts_cut(sup.text, audio=rec, language=language, cut_id=f"{utt_id}_tts")
                cut.supervisions[0].speaker = sup.speaker
                yield cut


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path, help="a LibriSpeech part: the folder holding <speaker>/<chapter>/")
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
