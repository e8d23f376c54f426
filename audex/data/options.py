"""The options of a data config: Audex's own keys beside NeMo's Lhotse dataloader keys, split per data split.

A ``data`` section (``conf/data/*.yaml``) holds shared keys (``max_length``, ``packing``, ``blend_epochs``, ...)
plus one section per split (``train_ds``, ``validation_ds``) in the schema of NeMo's Lhotse dataloader
(``input_cfg``, ``use_bucketing``, ``batch_tokens``, ...). :func:`split_config` separates the two:
:class:`AudexDataOptions` (typed, with the paper's defaults) and the NeMo config of the split.

Example::

    >>> options, nemo = split_config(OmegaConf.load("conf/data/default.yaml"), "train")
    >>> options.max_length, options.packing.buffer_size
    (262144, 8192)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from audex.data.filters import PaperFilterConfig
from audex.data.packing import PAPER_CONTEXT_LENGTH, PAPER_PACKING_BUFFER
from audex.data.sequence import SequenceBuilder
from audex.modules.audio_encoder import WindowedFrames
from audex.prompts import SYSTEM_PROMPT

SPLIT_SECTIONS = {"train": "train_ds", "val": "validation_ds", "validation": "validation_ds", "test": "test_ds"}


@dataclass
class PackingOptions:
    enabled: bool = True               # several samples per row (False: one sample per row, padded)
    online: bool = True                # pack over a buffer of the stream (the paper); False: per mini-batch
    buffer_size: int = PAPER_PACKING_BUFFER
    rows_per_batch: int = 1            # packed rows per micro-batch
    pad_to_multiple_of: int = 8
    fixed_length: bool = False         # pad every row to max_length (static shapes)
    max_carry: int = 2                 # times a sample may wait for a better-filled row
    extra_bins: int = 0                # bins beyond the lower bound per packing round (Megatron's delta)


@dataclass
class AudexDataOptions:
    manifest_dir: str | None = None    # relative cuts_path / shar_path are resolved against it
    max_length: int = PAPER_CONTEXT_LENGTH
    prompt_format: str = "audex"
    system_prompt: str | None = SYSTEM_PROMPT
    tta_num_frames: int = 500
    packing: PackingOptions = field(default_factory=PackingOptions)
    filters: dict = field(default_factory=lambda: dict(PaperFilterConfig().__dict__))
    max_skip_rate: float | None = 0.05
    min_examples_for_skip_rate: int = 100
    blend_epochs: dict = field(default_factory=dict)
    global_batch_size: int | None = None
    plan_estimate_cuts: int = 200      # examples per source measured to estimate its mean length
    trust_manifest_num_tokens: bool = True


def split_config(data_cfg: Mapping | DictConfig, split: str) -> tuple[DictConfig, DictConfig]:
    """``(audex_options, nemo_loader_config)`` of one split (see the module docstring)."""
    if not isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.create(dict(data_cfg))
    cfg = OmegaConf.create(OmegaConf.to_container(data_cfg, resolve=True))
    ours = {f for f in AudexDataOptions.__dataclass_fields__}
    if "input_cfg" in cfg:
        merged = cfg
    else:
        section = SPLIT_SECTIONS.get(split, split)
        if section not in cfg:
            raise KeyError(f"the data config has no {section!r} section for split {split!r}; it has "
                           f"{sorted(cfg.keys())}. Add {section}.input_cfg (see conf/data/default.yaml)")
        shared = {k: cfg[k] for k in cfg if k in ours}
        merged = OmegaConf.merge(OmegaConf.create(shared), cfg[section])
    options = OmegaConf.merge(OmegaConf.structured(AudexDataOptions),
                              {k: merged[k] for k in merged if k in ours})
    nemo = OmegaConf.create({k: merged[k] for k in merged if k not in ours})
    if "input_cfg" not in nemo:
        raise KeyError(f"split {split!r} has no input_cfg: list its manifests (type: lhotse, cuts_path: ...)")
    return options, nemo


def make_builder(options: DictConfig, tokenizer, frames_fn: Callable[[int], int] | None) -> SequenceBuilder:
    return SequenceBuilder(tokenizer, frames_fn or WindowedFrames(), max_length=int(options.max_length),
                           prompt_format=options.prompt_format, system_prompt=options.system_prompt,
                           tta_num_frames=int(options.tta_num_frames))
