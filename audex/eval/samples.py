"""Evaluation inputs: a Lhotse manifest, or a folder of audio files with a reference JSONL.

Every suite reads :class:`EvalSample` s: an id, the reference fields, and (for audio-input suites) a lazy
audio loader, so that a file that fails to load is reported for that sample while the others go on.

* **Lhotse manifest** (``CutSet`` JSONL/JSONL.gz, or a Lhotse Shar directory), schema of
  :mod:`audex.data.schema`: ``supervisions[0].text`` -> field ``text``, ``supervisions[0].language`` ->
  ``language``, every ``custom`` key (``translation``, ``question``, ``choices``, ``answer``, ``caption``,
  ``description``, ``sound_event``, ``messages``, ...) -> a field of the same name.
* **NeMo JSON manifest** (``audio_filepath``, ``duration``, ``text``, optional ``lang``; tarred with
  ``tarred_audio_filepaths``), read by :mod:`audex.data.nemo_manifest`: fields as for a Lhotse manifest.
* **Folder + reference JSONL**: one JSON object per line with ``id`` and the reference fields; the audio is
  ``audio`` (a path relative to the folder) or, when absent, ``<folder>/<id>.wav``. Audio files in the folder
  that no reference names are reported as ``unmatched_id``.
* **Reference JSONL without audio** (TTS, TTA, text): the same lines, no folder.

Problems found while reading (unreadable lines, duplicate ids, audio without reference) come back as
:class:`SampleProblem` s, which the suite writes to its per-sample JSONL with the reason.

Example::

    samples, problems = load_samples(manifest="librispeech_test_clean.jsonl.gz")
    wav = samples[0].load_audio()                 # 16 kHz mono, or AudioInputError naming the file
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from lhotse import CutSet

from audex.audio import load_audio, to_model_audio
from audex.data.nemo_manifest import is_nemo_manifest, read_manifest_cuts

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus")

# reasons a sample is not scored (or is flagged): the keys of the summary's accounting
UNREADABLE_REFERENCE = "unreadable_reference_line"
DUPLICATE_ID = "duplicate_id"
UNMATCHED_ID = "unmatched_id"
MISSING_REFERENCE = "missing_reference"
INVALID_REFERENCE = "invalid_reference"
AUDIO_LOAD_FAILED = "audio_load_failed"
MISSING_AUDIO = "missing_audio"
MISSING_HYPOTHESIS = "missing_hypothesis"
GENERATION_FAILED = "generation_failed"
EMPTY_REFERENCE = "empty_reference_after_normalization"
# flags: scored, but worth counting
EMPTY_HYPOTHESIS = "empty_hypothesis"
NO_ANSWER = "no_answer_extracted"


class SampleError(Exception):
    """A sample that cannot be scored: ``reason`` is one of the constants above, ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class SampleProblem:
    """Something wrong with the inputs that is not tied to a loadable sample (or that replaces one)."""

    sample_id: str
    reason: str
    detail: str


@dataclass
class EvalSample:
    id: str
    fields: dict[str, Any] = field(default_factory=dict)
    audio_source: str | None = None
    audio_loader: Callable[[], torch.Tensor] | None = None

    @property
    def has_audio(self) -> bool:
        return self.audio_loader is not None

    def load_audio(self) -> torch.Tensor:
        """16 kHz mono float32, or :class:`SampleError` (``missing_audio`` / ``audio_load_failed``)."""
        if self.audio_loader is None:
            raise SampleError(MISSING_AUDIO, f"sample {self.id!r} has no audio")
        try:
            return self.audio_loader()
        except SampleError:
            raise
        except Exception as e:  # any reader (soundfile, lhotse backends, a custom loader): the sample fails, not the run
            where = self.audio_source or self.id
            first_line = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise SampleError(AUDIO_LOAD_FAILED, first_line if where in first_line else f"{where}: {first_line}") from None

    def text_field(self, name: str, required: bool = True) -> str | None:
        """A non-empty string reference field, or :class:`SampleError` (``missing_reference``)."""
        value = self.fields.get(name)
        if isinstance(value, str) and value.strip():
            return value
        if required:
            raise SampleError(MISSING_REFERENCE, f"sample {self.id!r} has no {name!r} (got {value!r})")
        return None


def _cut_to_sample(cut) -> EvalSample:
    fields: dict[str, Any] = {}
    if cut.supervisions:
        sup = cut.supervisions[0]
        if sup.text is not None:
            fields["text"] = sup.text
        if sup.language is not None:
            fields["language"] = sup.language
        fields.update(sup.custom or {})
    fields.update(cut.custom or {})
    loader = None
    source = None
    if cut.has_recording:
        source = ", ".join(str(s.source) for s in cut.recording.sources) or cut.id
        loader = lambda cut=cut: to_model_audio(cut.load_audio(), int(cut.sampling_rate), f"cut {cut.id}")
    return EvalSample(cut.id, fields, source, loader)


def load_manifest_samples(manifest: str | Path, tarred_audio_filepaths=None) -> list[EvalSample]:
    path = Path(manifest)
    if tarred_audio_filepaths is not None or is_nemo_manifest(path):  # NeMo JSON manifest (plain or tarred)
        return [_cut_to_sample(c) for c in read_manifest_cuts(path, tarred_audio_filepaths)]
    if not path.exists():
        raise FileNotFoundError(f"manifest {str(path)!r} does not exist: give a Lhotse CutSet JSONL(.gz) or Shar "
                                "directory, or a NeMo JSON manifest")
    cuts = CutSet.from_shar(in_dir=str(path)) if path.is_dir() else CutSet.from_file(str(path))
    return [_cut_to_sample(c) for c in cuts]


def read_jsonl(path: str | Path) -> tuple[list[dict], list[SampleProblem]]:
    """JSON objects of a JSONL file (each with ``_line``, "file:line", for error reports); bad lines become
    ``unreadable_reference_line`` problems."""
    rows, problems = [], []
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"reference file {str(p)!r} does not exist")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(SampleProblem(f"{p.name}:{n}", UNREADABLE_REFERENCE, f"line {n} is not JSON ({e.msg})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)) or str(row.get("id")).strip() == "":
            problems.append(SampleProblem(f"{p.name}:{n}", UNREADABLE_REFERENCE, f"line {n} is not an object with an 'id'"))
            continue
        row["id"] = str(row["id"])
        row["_line"] = f"{p.name}:{n}"
        rows.append(row)
    return rows, problems


def _file_loader(path: Path, sample_id: str):
    def load() -> torch.Tensor:
        if not path.exists():
            raise SampleError(MISSING_AUDIO, f"sample {sample_id!r}: audio file {str(path)!r} does not exist")
        return load_audio(path, f"sample {sample_id} ({path})")

    return load


def load_reference_samples(references: str | Path, folder: str | Path | None = None) -> tuple[list[EvalSample], list[SampleProblem]]:
    """Samples from a reference JSONL, with audio from ``folder`` when given."""
    rows, problems = read_jsonl(references)
    root = Path(folder) if folder is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"audio folder {str(root)!r} does not exist")
    samples, seen, used_audio = [], set(), set()
    for row in rows:
        sid, line = row.pop("id"), row.pop("_line")
        if sid in seen:
            problems.append(SampleProblem(line, DUPLICATE_ID, f"id {sid!r} appears again at {line}; only its first line is scored"))
            continue
        seen.add(sid)
        audio_path = None
        if root is not None:
            rel = row.pop("audio", None)
            audio_path = root / rel if rel else root / f"{sid}.wav"
            used_audio.add(audio_path.resolve())
        elif row.get("audio"):
            audio_path = Path(row.pop("audio"))
        loader = _file_loader(audio_path, sid) if audio_path is not None else None
        samples.append(EvalSample(sid, row, str(audio_path) if audio_path else None, loader))
    if root is not None:
        for p in sorted(q for q in root.rglob("*") if q.suffix.lower() in AUDIO_SUFFIXES):
            if p.resolve() not in used_audio:
                problems.append(SampleProblem(str(p.relative_to(root)), UNMATCHED_ID,
                                              f"audio file {p.name} has no line in {Path(references).name}"))
    return samples, problems


def load_samples(manifest: str | Path | None = None, references: str | Path | None = None,
                 folder: str | Path | None = None, tarred_audio_filepaths=None
                 ) -> tuple[list[EvalSample], list[SampleProblem]]:
    """Read a Lhotse manifest or NeMo manifest (tarred: with ``tarred_audio_filepaths``), or a reference JSONL
    (with an optional audio folder)."""
    if manifest and references:
        raise ValueError("give either a Lhotse manifest or a reference JSONL, not both")
    if manifest:
        return load_manifest_samples(manifest, tarred_audio_filepaths), []
    if references:
        return load_reference_samples(references, folder)
    raise ValueError("no inputs: set manifest=<Lhotse CutSet> or references=<JSONL> (with folder=<audio dir> for audio)")


def load_hypotheses(path: str | Path, key: str = "hypothesis") -> tuple[dict[str, str], list[SampleProblem]]:
    """Precomputed outputs to score instead of generating: JSONL lines ``{"id", "<key>"}`` (for example the
    output of ``examples/audex_infer.py``, or of another system). Duplicate ids are problems."""
    rows, problems = read_jsonl(path)
    out: dict[str, str] = {}
    for row in rows:
        sid = row["id"]
        if sid in out:
            problems.append(SampleProblem(row["_line"], DUPLICATE_ID, f"hypothesis id {sid!r} appears again at "
                                                                      f"{row['_line']}; only its first line is scored"))
            continue
        value = row.get(key, row.get("text"))
        out[sid] = "" if value is None else str(value)
    return out, problems
