#!/usr/bin/env python
"""TSV/CSV tables of (audio, transcript[, translation]) -> Audex AST and multilingual ASR manifests.

Fits CoVoST2 (``path sentence translation client_id``, with header) and FLEURS (no header:
``id file_name raw_transcription transcription words num_samples gender``) and any table alike: name the
columns that hold the audio path, the source transcript, the English translation and, optionally, the
language and an id.

    # CoVoST2 de->en: AST and German ASR from one table
    python scripts/prepare_tsv_pairs.py covost_v2.de_en.train.tsv --audio-dir cv/de/clips --language de \\
        --translation-column translation --tasks ast,asr -o manifests/covost_de.jsonl.gz
    # FLEURS French ASR, language stated in the prompt (language-conditioned ASR, appendix A.7)
    python scripts/prepare_tsv_pairs.py fr_fr/train.tsv --audio-dir fr_fr/audio/train --language fr \\
        --column-names id,path,raw,sentence,words,num_samples,gender --transcript-column raw \\
        --tasks asr --language-in-prompt -o manifests/fleurs_fr.jsonl.gz

Cut ids are ``<id>_<task>`` (id: ``--id-column``, else the audio file's stem). Rows whose audio is
missing/unreadable/empty, or that lack a field the task needs, are skipped and counted.
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

TASKS = (schema.AST, schema.ASR)


def read_rows(table: Path, delimiter: str | None, column_names: list[str] | None) -> Iterator[dict[str, str]]:
    delimiter = delimiter or ("\t" if table.suffix.lower() == ".tsv" else ",")
    # CoVoST/FLEURS TSVs contain unbalanced quotes inside sentences: tabs are the only separator there
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with table.open(newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f, fieldnames=column_names, delimiter=delimiter, quoting=quoting)


def iter_cuts(args) -> Iterator[Cut | SkipSample]:
    columns_checked = False
    for row_no, row in enumerate(read_rows(args.table, args.delimiter, args.column_names), 1):
        if not columns_checked:
            wanted = [args.audio_column, args.transcript_column, args.id_column, args.language_column,
                      args.translation_column if schema.AST in args.tasks else None]
            missing = [c for c in wanted if c and c not in row]
            if missing:
                raise SystemExit(f"{args.table}: no column(s) {missing}; the table has {list(row)} "
                                 "(use --column-names for tables without a header)")
            columns_checked = True
        audio = Path(args.audio_dir) / (row.get(args.audio_column) or "")
        ex_id = (row.get(args.id_column) if args.id_column else None) or audio.stem or f"row{row_no}"
        language = (row.get(args.language_column) if args.language_column else None) or args.language
        transcript = (row.get(args.transcript_column) or "").strip()
        if not language or not transcript:
            yield SkipSample(MISSING_FIELD, f"row {row_no}: no {'language' if not language else 'transcript'}",
                             cut_id=ex_id)
            continue
        rec = probed(audio, ex_id, recording_id=ex_id)
        if isinstance(rec, SkipSample):
            yield rec
            continue
        for task in args.tasks:
            if task == schema.ASR:
                yield schema.make_asr_cut(rec, transcript, language, cut_id=f"{ex_id}_asr",
                                          language_in_prompt=args.language_in_prompt)
                continue
            translation = (row.get(args.translation_column) or "").strip()
            if not translation:
                yield SkipSample(MISSING_FIELD, f"row {row_no}: no translation", cut_id=f"{ex_id}_ast")
                continue
            yield schema.make_ast_cut(rec, transcript, language, translation, cut_id=f"{ex_id}_ast")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="a .tsv or .csv file")
    parser.add_argument("--audio-dir", type=Path, required=True, help="folder the audio paths are relative to")
    parser.add_argument("--tasks", type=comma_separated(TASKS), default=(schema.AST,), help="ast, asr or ast,asr")
    parser.add_argument("--language", help="source language id for every row (e.g. de)")
    parser.add_argument("--language-column", help="column with the source language id (overrides --language)")
    parser.add_argument("--audio-column", default="path")
    parser.add_argument("--transcript-column", default="sentence")
    parser.add_argument("--translation-column", default="translation")
    parser.add_argument("--id-column", help="column with a unique example id (default: the audio file's stem)")
    parser.add_argument("--delimiter", help="field separator (default: tab for .tsv, comma otherwise)")
    parser.add_argument("--column-names", type=lambda s: s.split(","),
                        help="the table has no header row; these are its columns (comma-separated)")
    parser.add_argument("--language-in-prompt", action="store_true",
                        help="ASR cuts state the language in the prompt (language-conditioned multilingual ASR)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if not args.language and not args.language_column:
        parser.error("give --language or --language-column: ASR and AST targets start with the source language")
    if not args.table.is_file():
        parser.error(f"{args.table} does not exist")
    return write_manifest(iter_cuts(args), args.output, "prepare_tsv_pairs", args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
