"""Batch inference over many inputs: load, batch, run a pipeline, write JSONL (and WAVs); failures are reported.

Inputs are records (``dict``): from WAV files, from texts, or from a Lhotse manifest (the fields of
:mod:`audex.data.schema`). Each record is prepared alone (audio read and resampled to 16 kHz mono); records
that cannot be prepared get an error line and the rest go on. Prepared records run in batches; if a batch
fails, its records are retried one by one so that only the ones that fail are reported, each with its reason.
Output lines keep the input order.

Example::

    >>> model = load_model("audex_2b.nemo")
    >>> records = records_from_wavs(["a.wav", "b.wav"])
    >>> summary = run_inference(AudexPipeline(model), "asr", records, "out/asr.jsonl", batch_size=8)
    >>> summary
    {'ok': 2, 'failed': 0, ...}
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lhotse import CutSet
from tqdm import tqdm

from audex.audio import load_audio
from audex.data import schema
from audex.data.sequence import load_cut_audio
from audex.inference.pipelines import AudexPipeline
from audex.inference.waveform import write_wav
from audex.tasks import task as task_spec
from audex.tool_calls import load_tools

logger = logging.getLogger("audex.inference")

# ---- inputs -------------------------------------------------------------------------------------
def records_from_wavs(patterns: Sequence[str], **fields) -> list[dict]:
    """One record per audio file (glob patterns allowed); ``fields`` (question, language, ...) go to all."""
    records = []
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not paths:
            records.append({"id": pattern, "audio_path": pattern, "error": f"no file matches {pattern!r}"})
        for p in paths:
            records.append({"id": Path(p).stem, "audio_path": p, **{k: v for k, v in fields.items() if v is not None}})
    return records


def records_from_texts(texts: Sequence[str], **fields) -> list[dict]:
    return [{"id": f"text_{i:05d}", "text": t, **{k: v for k, v in fields.items() if v is not None}}
            for i, t in enumerate(texts)]


def records_from_manifest(path: str | Path, task: str) -> list[dict]:
    """Records from a Lhotse CutSet: the audio and the fields ``task`` needs (schema of :mod:`audex.data.schema`)."""
    records = []
    for cut in CutSet.from_file(str(path)):
        rec: dict[str, Any] = {"id": cut.id, "cut": cut}
        custom = cut.custom or {}
        sup = cut.supervisions[0] if cut.supervisions else None
        if task == "asr" and custom.get("language_in_prompt") and sup is not None:
            rec["language"] = sup.language
        for key in ("question", "choices", "description", "sound_event"):
            if key in custom:
                rec[key] = custom[key]
        if task in ("tts", "chat") and sup is not None and sup.text:
            rec["text"] = sup.text
        if task == "tts" and custom.get("voice_codes") is not None:  # a voice-prompted TTS cut
            rec["voice"], rec["voice_text"] = schema.get_voice_prompt(cut)
        if task == "chat" and custom.get("tools"):  # a tool-calling chat: the definitions go in the system turn
            rec["tools"] = schema.get_tools(cut)
        if task == "chat" and custom.get("messages"):  # the chat up to its last user turn is the prompt
            messages = list(custom["messages"])
            rec["text"] = messages[:-1] if messages[-1].get("role") == "assistant" else messages
        if task == "tta" and "caption" in custom:
            rec["text"] = custom["caption"]
        records.append(rec)
    return records


def prepare(record: dict, task: str) -> dict:
    """Load the record's audio (16 kHz mono) and check the fields ``task`` needs; raises with the reason."""
    if "error" in record:
        raise ValueError(record["error"])
    spec = task_spec(task)
    rec = dict(record)
    if spec.audio_in:
        if "cut" in rec:
            rec["audio"] = load_cut_audio(rec["cut"])
        elif "audio_path" in rec:
            rec["audio"] = load_audio(rec["audio_path"])
    if task == "tts" and (rec.get("voice") is not None or rec.get("voice_text")):
        if rec.get("voice") is None or not rec.get("voice_text"):
            raise ValueError("a voice prompt needs both inputs.voice (a reference WAV) and inputs.voice_text (its "
                             "transcript)")
        if isinstance(rec["voice"], (str, Path)):
            rec["voice"] = load_audio(rec["voice"])
    if rec.get("tools") is not None:
        if task != "chat":
            raise ValueError(f"tool definitions (inputs.tools) are for task 'chat', not {task!r}")
        rec["tools"] = load_tools(rec["tools"])
    spec.check_record(rec)
    return rec


# ---- running ------------------------------------------------------------------------------------
def _run_batch(pipe: AudexPipeline, task: str, recs: list[dict], sampling: dict, wav_dir: Path | None) -> list[dict]:
    """Results (JSON-serialisable dicts) for one batch of prepared records."""
    spec = task_spec(task)
    out = spec.run(pipe, recs, **sampling)
    results = []
    for rec, res in zip(recs, out):
        row: dict[str, Any]
        output = spec.output
        if output in ("speech", "audio"):
            row = {"codec_frames": int(res.codes.shape[-1]), "seconds": res.waveform.numel() / 16000,
                   "finish_reason": res.finish_reason}
            wav = res.waveform
        elif output == "speech_turn":
            row = {"transcript": res.transcript, "reasoning": res.reasoning.thinking, "response": res.reasoning.text,
                   "answer": res.answer, "spoken_text": res.spoken_text, "seconds": res.speech.waveform.numel() / 16000}
            wav = res.speech.waveform
        else:
            row = {"text": res.text, "finish_reason": res.finish_reason}
            if res.thinking is not None:
                row["thinking"] = res.thinking
            if res.fields is not None:
                row["fields"] = res.fields
            if res.tool_calls is not None:
                row["tool_calls"] = res.tool_calls
                if res.tool_call_error:
                    row["tool_call_error"] = res.tool_call_error
            wav = None
        if wav is not None and wav_dir is not None:
            row["wav"] = str(write_wav(wav_dir / f"{rec['id']}.wav", wav))
        results.append(row)
    return results


def run_inference(pipe: AudexPipeline, task: str, records: Iterable[dict], output_jsonl: str | Path,
                  batch_size: int = 8, sampling: dict | None = None, wav_dir: str | Path | None = None,
                  progress: bool = True, on_result: Callable[[dict], None] | None = None) -> dict:
    """Run ``task`` over ``records``; one JSON line per record (``status``: ok | error, with ``error``)."""
    task_spec(task)  # an unknown task fails here, before any input is read
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = list(records)
    sampling = dict(sampling or {})
    wav_dir = Path(wav_dir) if wav_dir is not None else None
    output_jsonl = Path(output_jsonl)
    output_jsonl.parent.mkdir(parents=True, exist_ok=True)
    counts = {"ok": 0, "failed": 0}
    with open(output_jsonl, "w") as f, tqdm(total=len(records), disable=not progress, desc=task, unit="input") as bar:

        def emit(rec, result=None, error=None):
            line = {"id": rec["id"], "task": task}
            if error is None:
                line.update(status="ok", **result)
                counts["ok"] += 1
            else:
                line.update(status="error", error=error)
                counts["failed"] += 1
                logger.warning("input %s failed: %s", rec["id"], error)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            if on_result is not None:
                on_result(line)
            bar.update(1)

        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prepared: list[tuple[int, dict]] = []
            errors: dict[int, str] = {}
            for i, rec in enumerate(chunk):
                try:
                    prepared.append((i, prepare(rec, task)))
                except Exception as e:  # noqa: BLE001 - every input failure is reported, never fatal
                    errors[i] = f"{type(e).__name__}: {e}"
            results: dict[int, dict] = {}
            if prepared:
                try:
                    for (i, _), res in zip(prepared, _run_batch(pipe, task, [r for _, r in prepared], sampling, wav_dir)):
                        results[i] = res
                except Exception as batch_error:  # noqa: BLE001 - isolate the failing inputs
                    logger.info("batch at input %d failed (%s); retrying its inputs one by one", start, batch_error)
                    for i, rec in prepared:
                        try:
                            results[i] = _run_batch(pipe, task, [rec], sampling, wav_dir)[0]
                        except Exception as e:  # noqa: BLE001
                            errors[i] = f"{type(e).__name__}: {e}"
            for i, rec in enumerate(chunk):
                emit(rec, results.get(i), errors.get(i))
    return {**counts, "output": str(output_jsonl)}
