"""The loop every suite shares: resume, validate, batch through the engine, score, write, summarise.

A suite subclasses :class:`Suite` and fills four hooks:

* ``check(sample) -> reference``: the validated reference fields (raise :class:`SampleError` for missing or
  invalid references);
* ``prepare(sample, reference) -> input``: what the engine needs (audio, prompt text, ...);
* ``generate(inputs, references) -> outputs``: one batched call of the generation engine;
* ``score(sample, reference, output) -> dict``: the per-sample record (metrics, hypothesis, flags);

and ``summarize(records, summary)``, which computes the corpus-level numbers from the records alone, so a
resumed run (records read back from ``samples.jsonl``) scores exactly like an uninterrupted one.

Files in ``output_dir``: ``samples.jsonl`` (one line per sample: ``status`` "scored" or "error", the reason and
detail of errors, ``flags`` of scored samples), ``run.json`` (what produced them; a resumed run must match it),
``summary.json``, ``summary.md`` and the plots. Bad input never stops a run: each problem becomes an error line,
counted per reason in the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from tqdm.auto import tqdm

from audex.eval.engine import build_transcriber
from audex.eval.reference import ReferenceTables
from audex.eval.report import SuiteSummary, write_summary
from audex.eval.samples import (
    GENERATION_FAILED,
    MISSING_HYPOTHESIS,
    UNMATCHED_ID,
    EvalSample,
    SampleError,
    SampleProblem,
)

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
RUN_FILE = "run.json"


class ResumeMismatchError(RuntimeError):
    """The output folder holds results of a different run."""


class Suite:
    """Base class of the evaluation suites; see the module docstring for the hooks.

    Args:
        cfg: the suite's options (``conf/eval/suite/<name>.yaml``), a mapping.
        engine: the generation engine adapter (:class:`audex.eval.engine.EvalEngine`); ``None`` when scoring
            precomputed ``hypotheses``.
        hypotheses: ``id -> output text`` to score instead of generating (text-output suites only).
        transcriber: the judge ASR of generated speech (TTS, speech-to-speech); default: built on first use from
            ``cfg["asr_model"]`` (see :func:`audex.eval.engine.build_transcriber`).
    """

    name: ClassVar[str] = ""
    needs_audio: ClassVar[bool] = True
    supports_hypotheses: ClassVar[bool] = False

    def __init__(self, cfg: Mapping[str, Any] | None = None, engine=None, hypotheses: Mapping[str, str] | None = None,
                 references: ReferenceTables | None = None, transcriber=None):
        self.cfg = dict(cfg or {})
        self._transcriber = transcriber
        self.engine = engine
        self.hypotheses = dict(hypotheses) if hypotheses is not None else None
        self.references = references or ReferenceTables.load()
        if self.hypotheses is not None and not self.supports_hypotheses:
            raise ValueError(f"the {self.name} suite generates audio or runs a cascade: it cannot score precomputed "
                             "hypotheses; drop hypotheses= and give a model")
        if self.hypotheses is None and engine is None:
            raise ValueError(f"the {self.name} suite needs a model (engine) or precomputed hypotheses")
        self.out_dir: Path | None = None

    # ---- hooks ---------------------------------------------------------------------------------
    def expand(self, samples: list[EvalSample]) -> list[EvalSample]:
        """Samples as scored (the noisy-ASR suite turns one utterance into one sample per SNR level)."""
        return samples

    def check(self, sample: EvalSample) -> dict:
        raise NotImplementedError

    def prepare(self, sample: EvalSample, reference: dict) -> Any:
        """Default: the sample's audio (not loaded when scoring precomputed hypotheses)."""
        return sample.load_audio() if self.needs_audio and self.hypotheses is None else None

    def generate(self, inputs: list[Any], references: list[dict]) -> list[Any]:
        raise NotImplementedError

    def score(self, sample: EvalSample, reference: dict, output: Any) -> dict:
        raise NotImplementedError

    def summarize(self, records: list[dict], summary: SuiteSummary) -> None:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption."""
        return {"suite": self.name, "cfg": self.cfg, "engine": getattr(self.engine, "settings", None)}

    # ---- helpers for subclasses ----------------------------------------------------------------
    @property
    def transcriber(self):
        """The judge ASR of generated speech: ``asr_model`` = self (the model under test), a checkpoint, or
        ``hf:<folder>``."""
        if self._transcriber is None:
            self._transcriber = build_transcriber(self.cfg.get("asr_model"), self.engine)
        return self._transcriber

    def hypothesis_for(self, sample_id: str) -> str:
        if sample_id not in self.hypotheses:
            raise SampleError(MISSING_HYPOTHESIS, f"no hypothesis for sample {sample_id!r} in the hypotheses file")
        return self.hypotheses[sample_id]

    @staticmethod
    def scored(records: list[dict]) -> list[dict]:
        return [r for r in records if r.get("status") == "scored"]

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, samples: Sequence[EvalSample], out_dir: str | Path, model_label: str = "",
            problems: Sequence[SampleProblem] = (), batch_size: int = 8, resume: bool = True,
            retry_errors: bool = False, progress: bool = True, extra_notes: Sequence[str] = ()) -> SuiteSummary:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.out_dir = out
        samples_path = out / SAMPLES_FILE
        self._check_resume(out, model_label, resume)

        previous = _read_records(samples_path) if resume else {}
        if not resume and samples_path.exists():
            samples_path.unlink()
        expanded = self.expand(list(samples))
        problems = list(problems)
        if self.hypotheses is not None:
            known = {s.id for s in expanded}
            problems += [SampleProblem(h, UNMATCHED_ID, f"hypothesis id {h!r} matches no reference")
                         for h in self.hypotheses if h not in known]

        def done(sid: str) -> bool:
            rec = previous.get(sid)
            return rec is not None and (rec["status"] == "scored" or not retry_errors)

        todo = [s for s in expanded if not done(s.id)]
        new_problems = [p for p in problems if not done(p.sample_id)]
        skipped = len(expanded) - len(todo)
        if skipped:
            log.info("%s: resuming, %d of %d samples already in %s", self.name, skipped, len(expanded), samples_path)

        _end_with_newline(samples_path)  # a run killed mid-write leaves a torn line: keep it on its own line
        with open(samples_path, "a", encoding="utf-8") as sink:
            for p in new_problems:
                _write(sink, {"id": p.sample_id, "status": "error", "reason": p.reason, "detail": p.detail})
            bar = tqdm(total=len(todo), desc=f"eval {self.name}", unit="sample", disable=not progress)
            for start in range(0, len(todo), max(1, int(batch_size))):
                for record in self._run_batch(todo[start: start + batch_size]):
                    _write(sink, record)
                bar.update(len(todo[start: start + batch_size]))
            bar.close()

        records = _read_records(samples_path)
        order = {s.id: i for i, s in enumerate(expanded)}
        ordered = sorted(records.values(), key=lambda r: order.get(r["id"], len(order)))
        summary = self._summarize(ordered, model_label)
        summary.notes.extend(extra_notes)
        write_summary(summary, out, self.references)
        return summary

    def _run_batch(self, batch: list[EvalSample]) -> list[dict]:
        ready, records = [], {}
        for sample in batch:
            try:
                reference = self.check(sample)
                ready.append((sample, reference, self.prepare(sample, reference)))
            except SampleError as e:
                records[sample.id] = _error(sample.id, e)
        if ready:
            outputs = self._generate_isolating_failures(ready, records)
            for (sample, reference, _), output in zip(ready, outputs):
                if sample.id in records:
                    continue
                try:
                    record = {"id": sample.id, "status": "scored", "flags": []}
                    record.update(self.score(sample, reference, output))
                    records[sample.id] = record
                except SampleError as e:
                    records[sample.id] = _error(sample.id, e, reference)
        return [records[s.id] for s in batch]

    def _generate_isolating_failures(self, ready: list, records: dict) -> list[Any]:
        inputs = [item for _, _, item in ready]
        references = [ref for _, ref, _ in ready]
        if self.hypotheses is not None:
            outputs = []
            for sample, reference, _ in ready:
                try:
                    outputs.append(self.hypothesis_for(sample.id))
                except SampleError as e:
                    records[sample.id] = _error(sample.id, e, reference)
                    outputs.append(None)
            return outputs
        try:
            return self.generate(inputs, references)
        except Exception as batch_error:  # find the culprit(s): one sample must not sink its batch
            if len(ready) == 1:
                sample, reference, _ = ready[0]
                log.warning("%s: generation failed for %s: %s", self.name, sample.id, batch_error)
                records[sample.id] = _error(sample.id, SampleError(GENERATION_FAILED, f"{type(batch_error).__name__}: {batch_error}"), reference)
                return [None]
            outputs = []
            for one in ready:
                outputs.extend(self._generate_isolating_failures([one], records))
            return outputs

    def _summarize(self, records: list[dict], model_label: str) -> SuiteSummary:
        errors = [r for r in records if r["status"] == "error"]
        scored = self.scored(records)
        summary = SuiteSummary(
            suite=self.name, model=model_label, benchmark=self.cfg.get("benchmark"),
            counts={"total": len(records), "scored": len(scored), "errors": len(errors)},
            error_reasons=dict(Counter(r["reason"] for r in errors)),
            flags=dict(Counter(f for r in scored for f in r.get("flags", []))),
        )
        if scored:
            self.summarize(records, summary)
        else:
            summary.notes.append("no sample could be scored: see the error reasons above and samples.jsonl")
        return summary

    def _check_resume(self, out: Path, model_label: str, resume: bool) -> None:
        run_path = out / RUN_FILE
        current = {"model": model_label, **self.fingerprint(), "hypotheses": self.hypotheses is not None}
        current = json.loads(json.dumps(current, default=str))
        if resume and run_path.exists() and (out / SAMPLES_FILE).exists():
            before = json.loads(run_path.read_text())
            if before != current:
                changed = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
                raise ResumeMismatchError(
                    f"{out} holds results of a different run (changed: {changed}); use another output_dir, or "
                    "resume=false to start over")
        run_path.write_text(json.dumps(current, indent=2) + "\n")


def safe_name(sample_id: str) -> str:
    """A file name for a sample id: unsafe characters replaced, plus a short hash so that ids stay distinct."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[:80]
    return f"{stem}-{hashlib.blake2b(sample_id.encode(), digest_size=4).hexdigest()}"


def _error(sample_id: str, error: SampleError, reference: dict | None = None) -> dict:
    record = {"id": sample_id, "status": "error", "reason": error.reason, "detail": error.detail}
    if reference:
        record["reference"] = reference
    return record


def _write(sink, record: dict) -> None:
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()


def _end_with_newline(path: Path) -> None:
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _read_records(path: Path) -> dict[str, dict]:
    """Records by id (a later line replaces an earlier one, e.g. a retried error); a torn last line (killed
    run) is ignored."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("ignoring an unreadable line in %s (interrupted write)", path)
            continue
        if isinstance(rec, dict) and "id" in rec and rec.get("status") in ("scored", "error"):
            records[str(rec["id"])] = rec
    return records
