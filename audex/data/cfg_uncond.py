"""CFG pre-processing (section 4.3): unconditional copies of 10 % of the TTS and TTA examples.

Classifier-free guidance needs the unconditional distribution p(. | empty). Instead of dropping conditions on
the fly, the paper pre-selects a seeded 10 % of the speech- and audio-generation examples, replaces their
transcription or caption by a random number of untrainable padding tokens and blends these copies into the
training set. Here:

* per task (``tts``, ``tta``) exactly ``round(fraction * n_task)`` examples are chosen (round half up), with
  ``random.Random(seed)``: the same manifest and seed always give the same copies;
* a copy keeps everything but its condition: its id gets the suffix ``_cfg_uncond``, ``custom["cfg_uncond_pads"]``
  holds k, drawn uniformly from ``[min_pads, max_pads]``, and the transcript/caption is removed, so
  nothing but the k ``<pad>`` tokens can stand in its place; the
  :class:`~audex.data.sequence.SequenceBuilder` writes ``... transcription. <pad>...<pad><|im_end|>`` (user
  turn: never trained) followed by the unchanged codec answer;
* copies are written right after their original; the sampler shuffles.

Example::

    >>> cuts = CutSet.from_file("tts_tta.jsonl.gz")
    >>> blended = CutSet.from_cuts(blend_cfg_uncond(cuts, CfgUncondConfig(fraction=0.1, seed=0)))

The command-line front end is ``scripts/make_cfg_uncond.py``.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

from lhotse.cut import Cut
from lhotse.utils import fastcopy

from audex.data import schema

UNCOND_SUFFIX = "_cfg_uncond"


@dataclass(frozen=True)
class CfgUncondConfig:
    """``fraction`` of each generation task copied unconditionally; pad count uniform in [min_pads, max_pads]
    (128 covers the token length of typical transcripts and captions)."""

    fraction: float = 0.1
    seed: int = 0
    min_pads: int = 1
    max_pads: int = 128
    tasks: tuple[str, ...] = schema.GENERATION_TASKS

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must lie in [0, 1], got {self.fraction}")
        if not 1 <= self.min_pads <= self.max_pads:
            raise ValueError(f"need 1 <= min_pads <= max_pads, got {self.min_pads}, {self.max_pads}")
        bad = set(self.tasks) - set(schema.GENERATION_TASKS)
        if bad:
            raise ValueError(f"CFG copies are made for generation tasks {schema.GENERATION_TASKS} only, got {sorted(bad)}")


def num_selected(n: int, fraction: float) -> int:
    """round(fraction * n), halves rounded up (Python's round() would round 4.5 to 4)."""
    return int(math.floor(fraction * n + 0.5))


def select_uncond(ids_by_task: dict[str, list[str]], config: CfgUncondConfig) -> dict[str, int]:
    """Choose the copies: cut id -> pad count. ``ids_by_task`` lists each task's ids in manifest order."""
    rng = random.Random(config.seed)
    chosen: dict[str, int] = {}
    for task in sorted(ids_by_task):
        ids = ids_by_task[task]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate cut ids among the {task} examples: ids must be unique to select CFG copies")
        for idx in sorted(rng.sample(range(len(ids)), num_selected(len(ids), config.fraction))):
            chosen[ids[idx]] = rng.randint(config.min_pads, config.max_pads)
    return chosen


def make_uncond_copy(cut: Cut, num_pads: int) -> Cut:
    """The unconditional twin of a TTS/TTA cut: same target, condition replaced by ``num_pads`` pads."""
    task = schema.get_task(cut)
    if task not in schema.GENERATION_TASKS:
        raise ValueError(f"cut {cut.id!r} is a {task!r} example; CFG copies are made for {schema.GENERATION_TASKS}")
    custom = {k: v for k, v in (cut.custom or {}).items() if k != "caption"}
    custom["cfg_uncond_pads"] = int(num_pads)
    supervisions = [fastcopy(s, id=s.id + UNCOND_SUFFIX, text=None) for s in cut.supervisions]
    return fastcopy(cut, id=cut.id + UNCOND_SUFFIX, custom=custom, supervisions=supervisions)


def blend_cfg_uncond(cuts: Iterable[Cut], config: CfgUncondConfig = CfgUncondConfig()) -> Iterator[Cut]:
    """All cuts, each selected one followed by its unconditional copy. Reads ``cuts`` twice (a lazy
    ``CutSet`` from a manifest is fine; a one-shot generator is not)."""
    if iter(cuts) is cuts:
        raise TypeError("blend_cfg_uncond reads the cuts twice: pass a CutSet or a list, not a generator")
    ids_by_task: dict[str, list[str]] = defaultdict(list)
    for cut in cuts:
        custom = cut.custom or {}
        if custom.get("cfg_uncond_pads") is not None:
            raise ValueError(f"cut {cut.id!r} is already a CFG-unconditional copy: blend the copies into a manifest "
                             "that has none (running twice would add a second 10 %)")
        if custom.get("task") in config.tasks:
            ids_by_task[custom["task"]].append(cut.id)
    chosen = select_uncond(dict(ids_by_task), config)
    for cut in cuts:
        yield cut
        if cut.id in chosen:
            yield make_uncond_copy(cut, chosen.pop(cut.id))
    if chosen:
        raise RuntimeError(f"{len(chosen)} selected cuts were not seen on the second pass (e.g. {next(iter(chosen))!r}):"
                           " the manifest changed while it was read")
