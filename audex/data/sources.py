"""Cuts from other people's data -> the fields :mod:`audex.data.schema` reads.

A Lhotse recipe's CutSet, a NeMo manifest or a Hugging Face dataset carries audio, a transcript and perhaps
a language, but no Audex task. An ``input_cfg`` item says what its cuts are with NeMo's ``tags`` (copied into
every cut's ``custom`` by NeMo's reader); :func:`adapt_cut` then fills the schema's fields:

===========================  ==========================================================================
tag (or key of a line)       effect
===========================  ==========================================================================
``task: asr``                the task (``asr ast tts tta audio_qa``); a line's own ``task`` key is used
                             when the item has no ``task`` tag; anything else is an ``unknown_task`` skip
``language: en``             ``supervisions[0].language`` of every cut of the item (without it: each line's
                             ``lang`` in a NeMo manifest, or the language the recipe wrote, e.g. "English")
``translation_field: tgt``   AST: ``custom["translation"]`` from the named field
``caption_field: text``      TTA: ``custom["caption"]`` from the named field
``question_field``,          audio QA: ``custom["question"]`` / ``custom["answer"]`` from the named fields
``answer_field``             (or a fixed ``question: ...`` tag for every cut of the item)
===========================  ==========================================================================

A named field is looked up in ``cut.custom``, then in ``supervisions[0].custom``, then as an attribute of
``supervisions[0]`` (``text``). Fields that are missing or empty stay missing, so the sequence builder counts
the cut as a ``missing_field`` skip with its reason.

Example::

    - {type: lhotse, cuts_path: covost_cuts.jsonl.gz, blend: asr_ast,
       tags: {task: ast, language: de, translation_field: translation}}
"""

from __future__ import annotations

from typing import Any

from lhotse.cut import Cut
from lhotse.utils import fastcopy

#: tag -> the ``custom`` key of :mod:`audex.data.schema` it fills
FIELD_TAGS = {"translation_field": "translation", "caption_field": "caption", "question_field": "question",
              "answer_field": "answer"}
ADAPTER_TAGS = ("language", *FIELD_TAGS)


def lookup_field(cut: Cut, name: str) -> Any:
    """``name`` in ``cut.custom``, ``supervisions[0].custom`` or as an attribute of ``supervisions[0]``."""
    custom = cut.custom or {}
    if name in custom:
        return custom[name]
    if cut.supervisions:
        sup = cut.supervisions[0]
        if sup.custom and name in sup.custom:
            return sup.custom[name]
        return getattr(sup, name, None)
    return None


def needs_adapting(cut: Cut) -> bool:
    custom = cut.custom or {}
    return any(k in custom for k in ADAPTER_TAGS)


def adapt_cut(cut: Cut) -> Cut:
    """The cut with its adapter tags applied (see the module docstring); cuts without them are returned as is."""
    if not needs_adapting(cut):
        return cut
    custom = dict(cut.custom)
    for tag, key in FIELD_TAGS.items():
        name = custom.pop(tag, None)
        if name is not None and custom.get(key) is None:
            value = lookup_field(cut, name)
            if value is not None:
                custom[key] = value
    supervisions = cut.supervisions
    language = custom.pop("language", None)
    if language is not None and supervisions:
        supervisions = [fastcopy(supervisions[0], language=str(language)), *supervisions[1:]]
    return fastcopy(cut, custom=custom, supervisions=supervisions)
