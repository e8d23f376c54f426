"""The task registry: every task Audex runs, defined once, read by inference, evaluation, serving and the data schema.

A :class:`Task` says what a task takes (audio or not, which record field), what it gives (text, speech or
general audio), which decoding preset of ``conf/infer/presets.yaml`` it uses, whether its generation is guided by
CFG (paper eq. 3), which training-data task (``custom["task"]`` of a cut, :mod:`audex.data.schema`) teaches it,
and whether Audex's server offers it. :meth:`Task.run` calls the matching :class:`~audex.inference.pipelines.
AudexPipeline` method on a batch of records, so the batch runner, the evaluation engine and the serving engine
share one dispatch instead of three ``if task == ...`` ladders.

Example::

    >>> from audex.tasks import task
    >>> t = task("audio_qa")
    >>> t.audio_in, t.field, t.output, t.preset
    (True, 'question', 'text', 'audio_qa')
    >>> [r.text for r in t.run(pipe, [{"audio": wav, "question": "What is it?"}])]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

#: the training-data task tags of a cut (``custom["task"]``); ``text`` chats train the ``chat`` task
DATA_TASKS: tuple[str, ...] = ("asr", "ast", "tts", "tta", "audio_qa", "text")


def _field(records: Sequence[dict], name: str) -> list:
    return [r[name] for r in records]


def _asr(pipe, records, **sampling):
    langs = [r.get("language") for r in records]
    return pipe.asr(_field(records, "audio"), languages=langs if any(langs) else None, **sampling)


def _tts(pipe, records, **sampling):
    """Fixed-voice records and voice-prompted ones (``voice``: reference audio or codes, ``voice_text``: its
    transcript; :mod:`audex.voice_prompt`), each kind decoded as one batch, results in record order."""
    prompted = [i for i, r in enumerate(records) if r.get("voice") is not None]
    fixed = [i for i in range(len(records)) if i not in prompted]
    out: dict[int, Any] = {}
    if fixed:
        out.update(zip(fixed, pipe.tts([records[i]["text"] for i in fixed], **sampling)))
    if prompted:
        out.update(zip(prompted, pipe.tts([records[i]["text"] for i in prompted],
                                          voice=[records[i]["voice"] for i in prompted],
                                          voice_text=[records[i].get("voice_text") for i in prompted], **sampling)))
    return [out[i] for i in range(len(records))]


def _chat(pipe, records, **sampling):
    """Plain chats as one batch, and tool chats (``tools``: the record's tool definitions) one batch per tool list;
    results in record order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(json.dumps(r.get("tools"), sort_keys=True) if r.get("tools") else "", []).append(i)
    out: dict[int, Any] = {}
    for key, idx in groups.items():
        tools = records[idx[0]]["tools"] if key else None
        out.update(zip(idx, pipe.chat([records[i]["text"] for i in idx], tools=tools, **sampling)))
    return [out[i] for i in range(len(records))]


@dataclass(frozen=True)
class Task:
    """One task.

    Args:
        name: the task's name everywhere (CLI ``task=``, serving requests, eval suites).
        audio_in: the task takes one input audio per record (``record["audio"]``, 16 kHz mono).
        field: the record field it needs besides the audio (``None``: audio alone).
        output: ``text``, ``speech`` (X-Codec2 codes, 50 tokens/s), ``audio`` (X-Codec codes, 200 tokens/s) or
            ``speech_turn`` (the A.8 cascade: text and speech).
        preset: the decoding preset (``conf/infer/presets.yaml``; ``s2s`` names the cascade of presets).
        cfg: generation decodes a conditional row and its unconditional twin (eq. 3).
        data_task: the cut task that trains it (:data:`DATA_TASKS`), or ``None`` (an evaluation-time task).
        served: offered by Audex's server (:mod:`audex.serving`).
        call: ``(pipeline, records, **sampling) -> results``, one result per record.
    """

    name: str
    audio_in: bool
    field: str | None
    output: str
    preset: str
    cfg: bool
    data_task: str | None
    served: bool
    call: Callable[..., list]

    def check_record(self, record: dict) -> None:
        """Raise ``ValueError`` naming what a record lacks for this task."""
        if self.audio_in and record.get("audio") is None:
            raise ValueError(f"task {self.name!r} needs audio: give inputs.wav files or a manifest with recordings")
        if self.field is not None and not record.get(self.field):
            raise ValueError(f"task {self.name!r} needs the field {self.field!r} (e.g. inputs.{self.field}=... or a "
                             "manifest field)")
        if self.name == "mcq" and not record.get("choices"):
            raise ValueError("task 'mcq' needs 'choices' (a list of options) for every input")

    def run(self, pipeline, records: Sequence[dict], **sampling) -> list:
        """Run the pipeline on a batch of prepared records (each passing :meth:`check_record`)."""
        return self.call(pipeline, list(records), **sampling)


_REGISTRY: tuple[Task, ...] = (
    Task("asr", True, None, "text", "asr", False, "asr", True, _asr),
    Task("ast", True, None, "text", "ast", False, "ast", True,
         lambda p, rs, **s: p.ast(_field(rs, "audio"), **s)),
    Task("audio_qa", True, "question", "text", "audio_qa", False, "audio_qa", True,
         lambda p, rs, **s: p.audio_qa(_field(rs, "audio"), _field(rs, "question"), **s)),
    Task("mcq", True, "question", "text", "mcq", False, None, False,
         lambda p, rs, **s: p.mcq(_field(rs, "audio"), _field(rs, "question"), _field(rs, "choices"), **s)),
    Task("entailment", True, "description", "text", "entailment", False, None, False,
         lambda p, rs, **s: p.entailment(_field(rs, "audio"), _field(rs, "description"), **s)),
    Task("hallucination", True, "sound_event", "text", "hallucination", False, None, False,
         lambda p, rs, **s: p.hallucination(_field(rs, "audio"), _field(rs, "sound_event"), **s)),
    Task("s2s", True, None, "speech_turn", "s2s", False, None, False,
         lambda p, rs, **s: p.s2s(_field(rs, "audio"), **s)),
    Task("chat", False, "text", "text", "chat", False, "text", True, _chat),
    Task("tts", False, "text", "speech", "tts", True, "tts", True, _tts),
    Task("tta", False, "text", "audio", "tta", True, "tta", True,
         lambda p, rs, **s: p.tta(_field(rs, "text"), **s)),
)

#: every task by name, in a stable order
TASKS: dict[str, Task] = {t.name: t for t in _REGISTRY}
#: tasks Audex's server offers
SERVED_TASKS: tuple[str, ...] = tuple(t.name for t in _REGISTRY if t.served)
#: training-data tasks whose cut carries input audio (``<sound>`` in the prompt)
AUDIO_INPUT_DATA_TASKS: tuple[str, ...] = tuple(t.data_task for t in _REGISTRY if t.data_task and t.audio_in)
#: training-data tasks whose target is codec tokens (the ones CFG pre-processing touches)
GENERATION_DATA_TASKS: tuple[str, ...] = tuple(t.data_task for t in _REGISTRY if t.data_task and t.cfg)
assert set(t.data_task for t in _REGISTRY if t.data_task) == set(DATA_TASKS), "every data task trains a task"


def task(name: str) -> Task:
    """The task called ``name``, or a ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {list(TASKS)}")
    return TASKS[name]


def record_fields() -> tuple[str, ...]:
    """The record fields any task reads besides audio (for CLIs that take them as options); ``voice`` and
    ``voice_text`` are the optional voice prompt of ``tts``, ``tools`` the tool definitions of a ``chat``."""
    names: list[str] = []
    for t in _REGISTRY:
        if t.field and t.field not in names and t.field != "text":
            names.append(t.field)
    return ("language", *names, "choices", "voice", "voice_text", "tools")
