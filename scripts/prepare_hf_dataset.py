#!/usr/bin/env python
"""A Hugging Face audio dataset on disk -> an Audex manifest, through Lhotse's ``CutSet.from_huggingface_dataset``.

DATASET_DIR is a dataset written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (pick a split with
``--split``) or a local folder ``datasets.load_dataset`` reads (parquet or arrow files, e.g. a copy of a hub
dataset; an audiofolder with metadata.csv needs torchcodec, as datasets 5 encodes its audio); the hub is never
contacted (``HF_HUB_OFFLINE=1``). Columns map to the task:

=========  ======================================================================================
asr        ``--text-column`` (transcript), ``--language-column`` or ``--language``
ast        as asr, plus ``--translation-column`` (English)
audio_qa   ``--question-column`` (or a fixed ``--question``) and ``--answer-column``
tts        ``--text-column`` (transcript of clean speech; ``scripts/pretokenize.py`` adds the codes)
tta        ``--text-column`` (the caption; ``scripts/pretokenize.py`` adds the codes)
=========  ======================================================================================

    python scripts/prepare_hf_dataset.py my_ds/ --task asr --audio-column audio --text-column text \\
        --language en -o manifests/my_ds.jsonl.gz

Audio that the dataset stores as bytes is written once, as it is (no re-encoding), to
``--audio-dir`` (default: ``<output>.audio/``), and the manifest points at those files, so neither this
script nor training holds the corpus in memory; audio stored as a path to a local file is referenced
where it is. Rows with missing or unreadable audio, empty text or no language are counted skips with
their reason; the summary is printed at the end.

Why two passes over the rows: Lhotse's iterator stops at the first row it cannot decode (a generator that
raised cannot go on), so each row's audio and text are checked first and Lhotse reads only the good rows
(``Dataset.select``, an index list in memory). Lhotse reads only audio stored as bytes, so rows that hold
a path to a file become cuts with ``Recording.from_file`` here.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from array import array
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets reads its configuration: no hub access
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import soundfile as sf  # noqa: E402
from lhotse import CutSet, Recording  # noqa: E402
from lhotse.cut import Cut  # noqa: E402

from audex.data import schema  # noqa: E402
from audex.data.prepare import add_output_args, probe_recording, write_manifest  # noqa: E402
from audex.data.skips import CORRUPT_AUDIO, MISSING_AUDIO, MISSING_FIELD, ZERO_LENGTH_AUDIO, SkipSample  # noqa: E402

TASKS = (schema.ASR, schema.AST, schema.AUDIO_QA, schema.TTS, schema.TTA)
SUFFIX_OF_FORMAT = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3", "AIFF": ".aiff"}


def load_dataset_dir(path: Path, split: str | None) -> datasets.Dataset:
    """``load_from_disk`` for a saved dataset, else ``load_dataset`` on the local folder; one split."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(str(path))
        except (ImportError, datasets.exceptions.DatasetGenerationError) as e:
            cause = e if isinstance(e, ImportError) else e.__cause__ or e
            raise SystemExit(
                f"datasets cannot build {path}: {type(cause).__name__}: {cause}\n"
                "Folders of parquet/arrow files and save_to_disk folders need no audio decoder. An audiofolder "
                "(audio files + metadata.csv) needs torchcodec in datasets 5; without it, read the same layout with "
                f"python scripts/prepare_tsv_pairs.py {path}/metadata.csv --audio-dir {path} --audio-column file_name "
                "--transcript-column <column> --tasks asr") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise SystemExit(f"{path} holds the splits {sorted(ds)}: choose one with --split")
        ds = ds[split]
    return ds


def text_columns(args) -> dict[str, str]:
    """Audex field -> dataset column, for ``args.task``."""
    cols = {schema.ASR: {"transcript": args.text_column},
            schema.AST: {"transcript": args.text_column, "translation": args.translation_column},
            schema.AUDIO_QA: {"question": args.question_column, "answer": args.answer_column},
            schema.TTS: {"transcript": args.text_column},
            schema.TTA: {"caption": args.text_column}}[args.task]
    if args.task == schema.AUDIO_QA and args.question is not None:
        cols.pop("question")
    return cols


def _nonempty(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_row(row: dict, args, columns: dict[str, str], root: Path, cut_id: str) -> Recording | None:
    """Raise :class:`SkipSample` for a row Audex cannot use; a Recording when the audio is a local file."""
    for field, col in columns.items():
        if not _nonempty(row.get(col)):
            raise SkipSample(MISSING_FIELD, f"column {col!r} ({field}) is empty", cut_id)
    if args.task in (schema.ASR, schema.AST) and not (_nonempty(row.get(args.language_column)) or args.language):
        raise SkipSample(MISSING_FIELD, f"no language: column {args.language_column!r} is empty and --language is "
                         "not set", cut_id)
    audio = row.get(args.audio_column)
    if not audio or (audio.get("bytes") is None and not audio.get("path")):
        raise SkipSample(MISSING_AUDIO, f"column {args.audio_column!r} is empty", cut_id)
    if audio.get("bytes") is None:
        path = Path(audio["path"])
        return probe_recording(path if path.is_absolute() else root / path, recording_id=cut_id)
    try:
        rec = Recording.from_bytes(audio["bytes"], recording_id=cut_id)
    except Exception as e:  # lhotse tries every audio backend and raises its own error type
        raise SkipSample(CORRUPT_AUDIO, f"audio bytes cannot be decoded ({str(e).splitlines()[0][:200]})", cut_id) from None
    if rec.num_samples == 0:
        raise SkipSample(ZERO_LENGTH_AUDIO, "the audio has no samples", cut_id)
    return None


def audio_suffix(audio: dict) -> str:
    """The file suffix for a row's audio bytes: its file name's, else the container format's."""
    name = audio.get("path")
    if name and Path(name).suffix:
        return Path(name).suffix.lower()
    try:
        return SUFFIX_OF_FORMAT.get(sf.info(io.BytesIO(audio["bytes"])).format, ".audio")
    except Exception:  # a container soundfile does not read (Lhotse's other backends did)
        return ".audio"


def write_audio(rec: Recording, path: Path) -> Recording:
    """The in-memory recording Lhotse made from the row's bytes, written once to ``path``, as a file Recording."""
    path.write_bytes(rec.sources[0].source)
    return Recording.from_file(path, recording_id=path.stem)


def make_cut(rec: Recording, row: dict, args) -> Cut:
    """The Audex cut of one row (its fields from ``row``: Lhotse's cut.custom plus supervision fields)."""
    cut_id = rec.id
    language = row.get(args.language_column) if _nonempty(row.get(args.language_column)) else args.language
    if args.task == schema.ASR:
        return schema.make_asr_cut(rec, row[args.text_column], language, cut_id=cut_id)
    if args.task == schema.AST:
        return schema.make_ast_cut(rec, row[args.text_column], language, row[args.translation_column], cut_id=cut_id)
    if args.task == schema.AUDIO_QA:
        question = args.question if args.question is not None else row[args.question_column]
        return schema.make_audio_qa_cut(rec, question, row[args.answer_column], cut_id=cut_id)
    if args.task == schema.TTS:
        return schema.make_tts_cut(row[args.text_column], audio=rec, language=language, cut_id=cut_id)
    return schema.make_tta_cut(row[args.text_column], audio=rec, cut_id=cut_id)


def iter_cuts(ds: datasets.Dataset, args, root: Path, audio_dir: Path) -> Iterator[Cut | SkipSample]:
    columns = text_columns(args)
    missing = [c for c in [args.audio_column, *columns.values()] if c not in ds.column_names]
    if missing:
        raise SystemExit(f"{root} has no column(s) {missing}; its columns: {ds.column_names}")
    ds = ds.cast_column(args.audio_column, datasets.Audio(decode=False))

    def cut_id(row: int) -> str:
        return f"{args.id_prefix}-{row:08d}"

    # rows Lhotse reads in pass 2, and their audio file suffixes (compact: a corpus may hold millions of rows)
    from_bytes, suffix_code, suffixes = array("q"), array("H"), {}
    for i, row in enumerate(ds):  # pass 1: checks; local files become cuts right away
        try:
            rec = check_row(row, args, columns, root, cut_id(i))
        except SkipSample as e:
            yield e
            continue
        if rec is None:
            from_bytes.append(i)
            suffix_code.append(suffixes.setdefault(audio_suffix(row[args.audio_column]), len(suffixes)))
        else:
            yield make_cut(rec, row, args)
    if not from_bytes:
        return
    audio_dir.mkdir(parents=True, exist_ok=True)
    suffix_of = {code: suffix for suffix, code in suffixes.items()}
    good = ds.select(from_bytes, keep_in_memory=True)
    # pass 2: Lhotse's HF reader (text and language into the supervision, the other columns into cut.custom)
    lhotse_cuts = CutSet.from_huggingface_dataset(good, audio_key=args.audio_column, text_key=args.text_column,
                                                  lang_key=args.language_column)
    for i, code, cut in zip(from_bytes, suffix_code, lhotse_cuts):
        rec = write_audio(cut.recording, audio_dir / f"{cut_id(i)}{suffix_of[code]}")
        sup = cut.supervisions[0]
        yield make_cut(rec, {**(cut.custom or {}), args.text_column: sup.text, args.language_column: sup.language},
                       args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="folder of a dataset saved with save_to_disk, or a local dataset folder")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--split", help="split of a DatasetDict (needed when it has several)")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--text-column", default="text", help="transcript (asr, ast, tts) or caption (tta)")
    parser.add_argument("--translation-column", default="translation", help="ast: the English translation")
    parser.add_argument("--question-column", default="question", help="audio_qa")
    parser.add_argument("--question", help="audio_qa: one question for every row, instead of a column")
    parser.add_argument("--answer-column", default="answer", help="audio_qa")
    parser.add_argument("--language-column", default="language", help="asr/ast/tts: the language of each row")
    parser.add_argument("--language", help="asr/ast/tts: the language of rows without a language column value")
    parser.add_argument("--id-prefix", help="cut ids are <prefix>-<row>; default: the dataset folder's name")
    parser.add_argument("--audio-dir", type=Path, help="where audio stored as bytes is written (default <output>.audio)")
    add_output_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.dataset.is_dir():
        parser.error(f"{args.dataset} is not a folder")
    args.id_prefix = args.id_prefix or args.dataset.resolve().name
    name = args.output.name.split(".")[0]
    audio_dir = args.audio_dir or args.output.parent / f"{name}.audio"
    ds = load_dataset_dir(args.dataset, args.split)
    return write_manifest(iter_cuts(ds, args, args.dataset, audio_dir), args.output, "prepare_hf_dataset",
                          args.max_skip_rate)


if __name__ == "__main__":
    sys.exit(main())
