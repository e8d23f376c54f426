"""Data blending in epochs, as Table 3 of the paper writes it.

A stage draws each source (a manifest, or a data type of several) a number of *epochs*: text 0.5, audio
understanding 2, TTS 1, TTA 2 in the audio warmup, etc. Lhotse's ``CutSet.mux`` -- which NeMo's ``input_cfg``
weights feed -- draws one example at a time with fixed probabilities, so epochs become weights by

    weight_i = epochs_i x examples_i,   draws of a stage = sum_i epochs_i x examples_i

after which every source has been seen its number of epochs (in expectation; the loader tests measure it
within 2 %). With the mean tokens per example, the token share of each data type follows (Table 3's
"Text weights (%)" row is the text share of the tokens) and so do the optimizer steps of a stage.

Example (Table 2's token counts and Table 3's "Audio Warmup" epochs)::

    >>> plan = blend_from_epochs({"text": 0.5, "understanding": 2, "tts": 1, "tta": 2},
    ...                          num_samples={"text": 33e6, "understanding": 49e6, "tts": 147e6, "tta": 12e6},
    ...                          num_tokens={"text": 303e9, "understanding": 29.9e9, "tts": 81e9, "tta": 24.7e9})
    >>> round(100 * plan.token_shares()["text"])
    44
    >>> round(plan.weights["tts"], 3)                 # CutSet.mux probability of a TTS example
    0.515
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lhotse.lazy import count_newlines_fast
from omegaconf import DictConfig, ListConfig, OmegaConf

from audex.data.nemo_manifest import NEMO_TYPES, count_manifest_lines

log = logging.getLogger("audex.data")

#: keys of an ``input_cfg`` item that Audex reads and removes before NeMo sees the item
AUDEX_ITEM_KEYS = ("blend", "epochs", "num_samples", "name")


@dataclass
class BlendSource:
    """One manifest of a blend: its data type (``blend``), epochs, examples and mean tokens per example."""

    name: str
    blend: str
    epochs: float
    num_samples: int
    mean_tokens: float | None = None

    @property
    def samples(self) -> float:
        return self.epochs * self.num_samples

    @property
    def tokens(self) -> float:
        if self.mean_tokens is None:
            raise ValueError(f"source {self.name!r} has no mean token count: use plan_blend() to measure it")
        return self.samples * self.mean_tokens


@dataclass
class BlendPlan:
    """What a stage draws: per source ``epochs x num_samples`` examples (see the module docstring)."""

    sources: list[BlendSource]

    @property
    def total_samples(self) -> int:
        return int(round(sum(s.samples for s in self.sources)))

    @property
    def total_tokens(self) -> float:
        return sum(s.tokens for s in self.sources)

    @property
    def weights(self) -> dict[str, float]:
        """Sampling probability per source (``CutSet.mux`` draws one example at a time)."""
        total = sum(s.samples for s in self.sources)
        return {s.name: s.samples / total for s in self.sources}

    def sample_shares(self) -> dict[str, float]:
        return self._shares(lambda s: s.samples)

    def token_shares(self) -> dict[str, float]:
        """Share of the tokens per data type (Table 3 reports the text share)."""
        return self._shares(lambda s: s.tokens)

    def _shares(self, amount) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self.sources:
            out[s.blend] = out.get(s.blend, 0.0) + amount(s)
        total = sum(out.values())
        return {k: v / total for k, v in out.items()}

    def optimizer_steps(self, global_batch_size: int, max_length: int | None = None, packing_fill: float = 0.99) -> int:
        """Optimizer steps of the stage. ``global_batch_size`` counts rows: samples when padded
        (``max_length=None``), packed rows of ``max_length`` tokens at ``packing_fill`` real tokens otherwise."""
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        rows = self.total_samples if max_length is None else self.total_tokens / (max_length * packing_fill)
        return max(1, math.ceil(rows / global_batch_size))

    def describe(self) -> str:
        lines = [f"blend: {self.total_samples} samples"]
        for s in self.sources:
            tok = f", ~{s.mean_tokens:.0f} tokens each" if s.mean_tokens is not None else ""
            lines.append(f"  {s.name} [{s.blend}]: {s.epochs:g} epochs x {s.num_samples} = {s.samples:.0f} "
                         f"samples (weight {self.weights[s.name]:.4f}){tok}")
        return "\n".join(lines)


def blend_from_epochs(epochs: Mapping[str, float], num_samples: Mapping[str, float],
                      num_tokens: Mapping[str, float] | None = None) -> BlendPlan:
    """{source: epochs} + {source: examples} (+ {source: tokens in one epoch}) -> :class:`BlendPlan`.

    Sources with 0 epochs are left out (they draw nothing); a source without a size is an error.
    """
    sources = []
    for name, e in epochs.items():
        if e < 0:
            raise ValueError(f"source {name!r} has {e} epochs; epochs must be >= 0")
        if name not in num_samples:
            raise KeyError(f"source {name!r} has epochs but no size; sizes are given for {sorted(num_samples)}")
        if e == 0:
            continue
        n = num_samples[name]
        if n <= 0:
            raise ValueError(f"source {name!r} is empty ({n} examples) but should be drawn {e} epochs")
        mean = num_tokens[name] / n if num_tokens is not None else None
        sources.append(BlendSource(name=name, blend=name, epochs=float(e), num_samples=int(n), mean_tokens=mean))
    if not sources:
        raise ValueError("every source has 0 epochs: nothing to train on")
    return BlendPlan(sources)


# ---- NeMo input_cfg: paths, sizes, weights -------------------------------------------------------
def _resolve_path(value: Any, manifest_dir: str | None) -> Any:
    if manifest_dir is None or not isinstance(value, str) or "://" in value or Path(value).is_absolute():
        return value
    return str(Path(manifest_dir) / value)


def item_name(item: Mapping) -> str:
    for key in ("name", "cuts_path", "shar_path", "manifest_filepath"):
        if item.get(key) is not None:
            return str(item[key])
    return str(item.get("type", "source"))


def count_samples(item: Mapping) -> int:
    """Examples in one ``input_cfg`` item: ``num_samples`` if given, else counted from its Lhotse manifest."""
    if item.get("num_samples") is not None:
        return int(item["num_samples"])
    if item.get("cuts_path") is not None and item.get("shar_path") is None:
        path = Path(item["cuts_path"])
        if not path.is_file():
            raise FileNotFoundError(f"input_cfg item {item_name(item)!r}: manifest {path} does not exist")
        return count_newlines_fast(path)
    shar = item.get("shar_path")
    if isinstance(shar, str):
        files = sorted(Path(shar).glob("cuts.*.jsonl*"))
        if not files:
            raise FileNotFoundError(f"input_cfg item {item_name(item)!r}: no cuts.*.jsonl* files in {shar}")
        return sum(count_newlines_fast(f) for f in files)
    if isinstance(shar, Mapping) and shar.get("cuts") is not None:
        cuts = shar["cuts"]
        return sum(count_newlines_fast(f) for f in ([cuts] if isinstance(cuts, str) else cuts))
    if item.get("manifest_filepath") is not None and item.get("type") in (*NEMO_TYPES, *NEMO_TYPES.values()):
        return count_manifest_lines(item["manifest_filepath"])
    raise ValueError(f"input_cfg item {item_name(item)!r} (type {item.get('type')!r}): cannot count its examples; "
                     "add num_samples to the item")


def annotate_input_cfg(items, blend_epochs: Mapping[str, float] | None = None, manifest_dir: str | None = None,
                       with_weights: bool = True, inherited: tuple[str | None, float | None] = (None, None)
                       ) -> tuple[list[dict], list[BlendSource]]:
    """NeMo ``input_cfg`` items -> items with paths resolved against ``manifest_dir`` and (``with_weights``) the
    NeMo ``weight`` of their epochs, 0-epoch items left out; also returns the blend's sources.

    An item's epochs: its own ``epochs``, else ``blend_epochs[item.blend]``; groups pass theirs to their items,
    and a group's weight is the sum of its items' (NeMo multiplies the weights of nested groups).
    """
    blend_epochs = blend_epochs or {}
    out: list[dict] = []
    sources: list[BlendSource] = []
    items = OmegaConf.to_container(items, resolve=True) if isinstance(items, (DictConfig, ListConfig)) else items
    if isinstance(items, str):
        raise ValueError("input_cfg as a path to a YAML file is not supported by Audex's loader: inline the list")
    for raw in items:
        item = dict(raw)
        blend = item.get("blend", inherited[0])
        epochs = item.get("epochs", inherited[1])
        if item.get("type") in NEMO_TYPES:  # NeMo manifests: Audex's reader (see audex.data.nemo_manifest)
            item["type"] = NEMO_TYPES[item["type"]]
        for key in ("cuts_path", "shar_path", "manifest_filepath", "tarred_audio_filepaths"):
            if isinstance(item.get(key), str):
                item[key] = _resolve_path(item[key], manifest_dir)
            elif isinstance(item.get(key), list):
                item[key] = [_resolve_path(v, manifest_dir) if isinstance(v, str) else v for v in item[key]]
        if item.get("type") == "group":
            children, child_sources = annotate_input_cfg(item.get("input_cfg", []), blend_epochs, manifest_dir,
                                                         with_weights, (blend, epochs))
            if not children:
                continue
            item["input_cfg"] = children
            if with_weights:
                item["weight"] = sum(c["weight"] for c in children)
            sources.extend(child_sources)
        elif with_weights:
            if epochs is None:
                if blend is None:
                    raise KeyError(f"input_cfg item {item_name(item)!r} needs `blend: <data type>` (a key of "
                                   "blend_epochs) or its own `epochs`")
                if blend not in blend_epochs:
                    raise KeyError(f"input_cfg item {item_name(item)!r} has blend {blend!r}, which blend_epochs "
                                   f"does not list (it has {sorted(blend_epochs)})")
                epochs = float(blend_epochs[blend])
            if epochs < 0:
                raise ValueError(f"input_cfg item {item_name(item)!r}: epochs must be >= 0, got {epochs}")
            if epochs == 0:
                log.info("data blend: %s has 0 epochs in this stage and is not drawn", item_name(item))
                continue
            n = count_samples(item)
            if n == 0:
                raise ValueError(f"input_cfg item {item_name(item)!r} is empty but should be drawn {epochs} epochs")
            source = BlendSource(item_name(item), blend or item_name(item), float(epochs), n)
            item["weight"] = source.samples  # CutSet.mux normalises: probability = epochs x examples / total
            sources.append(source)
        for key in AUDEX_ITEM_KEYS:
            item.pop(key, None)
        out.append(item)
    return out, sources


def used_blends(items) -> set[str]:
    used = set()
    for item in items:
        if item.get("blend") is not None:
            used.add(item["blend"])
        if item.get("type") == "group":
            used |= used_blends(item.get("input_cfg", []))
    return used




def leaf_items(items):
    for item in items:
        if item.get("type") == "group":
            yield from leaf_items(item["input_cfg"])
        else:
            yield item
