"""Data loaders for training and validation: manifests -> blend in epochs (Table 3) -> sampler -> batches.

``build_dataloader(data_cfg, tokenizer, frames_fn, split)`` is what ``AudexModel.setup_training_data`` and the
training run call. ``data_cfg`` is the ``data`` section of a stage config (``conf/data/*.yaml``), split into
Audex's options and NeMo's Lhotse dataloader keys by :func:`audex.data.options.split_config`. Skipped cuts are
counted by :class:`audex.data.skips.LoaderSkips`.

**Blending in epochs** (:mod:`audex.data.blend`). Each ``input_cfg`` item names its data type
(``blend: tts``, a key of ``blend_epochs``: the rows of Table 3) or its own ``epochs``; its NeMo ``weight``
becomes epochs x examples (counted from the manifest, or ``num_samples``). One training pass draws the whole
stage, sum(epochs x examples) examples, so each source is seen its number of epochs; :func:`plan_blend`
adds the mean tokens per source and gives the stage's optimizer steps (:meth:`BlendPlan.optimizer_steps`).

**Seeds.** ``seed`` + ``epoch`` seed the blend and the shuffling, so the same epoch always yields the same
batches, whatever the number of workers (what an exact mid-epoch resume needs); ``shard_seed: trng`` asks for
a fresh order on every run.

**Sampling.** ``input_cfg`` is read by NeMo's own reader (``read_cutset_from_config``: Lhotse JSONL and
Shar, nested groups, tags, weights -> ``CutSet.mux``), then cuts pass the paper's filters
(:mod:`audex.data.filters`), their exact token length is measured with the
:class:`~audex.data.sequence.SequenceBuilder` (``custom["num_tokens"]`` in the manifest, when present,
is trusted), and Lhotse's ``DynamicBucketingSampler`` (``use_bucketing``) or ``DynamicCutSampler`` batches
them under Lhotse's ``TokenConstraint`` (``batch_tokens`` counts padded tokens, ``batch_size`` examples).
The dataloader workers build the sequences (audio, tokens, codec ids); then either
:class:`~audex.data.dataset.PackedStream` packs them online over an 8,192-sample buffer in this process
(``packing.enabled`` and ``packing.online``), or :class:`~audex.data.dataset.AudexDataset` pads (or packs)
each sampled mini-batch in the worker.

Why the sampler is built here and not by ``get_lhotse_dataloader_from_config``: NeMo's loader
(a) resamples every cut, which fails on Audex's cuts without a recording (text chats, pre-tokenised
TTS/TTA), and (b) measures a cut as ``ceil(duration / token_equivalent_duration)`` plus supervision tokens,
which misses the chat template, counts a 10 s TTA target as 250 instead of 2,000 codec tokens and a 2 s
ASR clip as 50 instead of 750 encoder frames (the encoder pads every clip to a 30 s window). Audex keeps
NeMo's config keys, NeMo's ``input_cfg`` reader and Lhotse's samplers, and only measures lengths itself.
For audio-only blends (ASR/AST/audio QA), ``use_multimodal_sampling: false`` hands the whole loader to
``get_lhotse_dataloader_from_config`` (duration-based ``batch_duration``/bucketing, NeMo's on-the-fly
noise/RIR/speed augmentation keys) with :class:`~audex.data.dataset.AudexDataset` as its dataset (packing,
if enabled, per sampled mini-batch). NeMo then owns the pass: several sources are muxed endlessly (the
stage ends at ``trainer.max_steps``) and a single source is read once.

Example::

    >>> cfg = OmegaConf.load("conf/data/demo.yaml")
    >>> loader = build_dataloader(cfg, model.tokenizer, model.frames_for_samples, "train")
    >>> batch = next(iter(loader))                  # PackedBatch
    >>> plan = plan_blend(cfg, model.tokenizer, model.frames_for_samples)
    >>> plan.optimizer_steps(global_batch_size=64, max_length=cfg.max_length)
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Callable, Iterator, Mapping

import torch
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler
from lhotse.dataset.sampling.base import TokenConstraint
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
from nemo.collections.common.data.lhotse.cutset import read_cutset_from_config
from nemo.collections.common.data.lhotse.dataloader import (
    get_lhotse_dataloader_from_config,
    make_structured_with_schema_warnings,
)
from omegaconf import DictConfig, OmegaConf

from audex.data.blend import BlendPlan, annotate_input_cfg, item_name, leaf_items, used_blends
from audex.data.collate import PackedBatch
from audex.data.dataset import AudexDataset, PackedStream, SequenceDataset
from audex.data.filters import PaperFilterConfig, PaperFilters
from audex.data.options import make_builder, split_config
from audex.data.packing import OnlinePacker
from audex.data.sequence import SequenceBuilder
from audex.data.skips import TOO_LONG_FOR_CONTEXT, LoaderSkips, SkipEvents, SkipSample

log = logging.getLogger("audex.data")



# ---- reading the cuts -----------------------------------------------------------------------------
def _read_cuts(nemo: DictConfig, input_cfg: list[dict], finite: bool, seed: int | str = 0) -> CutSet:
    """NeMo's ``read_cutset_from_config``: Lhotse JSONL/Shar, groups, tags; weights -> ``CutSet.mux``."""
    if finite:  # validation: every manifest once, in order
        parts = []
        for item in input_cfg:
            cfg = OmegaConf.create({"input_cfg": [item], "force_finite": True, "shuffle": False, "shard_seed": 0,
                                    "metadata_only": False})
            parts.append(read_cutset_from_config(cfg)[0])
        cuts = parts[0]
        for p in parts[1:]:
            cuts = cuts + p
        return cuts
    cfg = OmegaConf.create({k: nemo[k] for k in ("shuffle", "max_open_streams", "reweight_temperature") if k in nemo})
    cfg.input_cfg = input_cfg
    cfg.force_finite = False
    cfg.shard_seed = seed  # seeds CutSet.mux (and the shard order of Shar sources)
    cuts, _ = read_cutset_from_config(cfg)
    return cuts.repeat(preserve_id=True)  # a single source is not muxed (and so not repeated) by NeMo


class FirstCuts:
    """The first ``n`` cuts of an endless blend: one training pass draws the whole stage."""

    def __init__(self, cuts: CutSet, n: int):
        self.cuts, self.n = cuts, int(n)

    def __iter__(self):
        return islice(iter(self.cuts), self.n)


class MeasureTokens:
    """``cut -> cut`` with ``num_tokens`` (its exact built length, for Lhotse's ``TokenConstraint``), or ``None``
    when the cut is bad or longer than ``max_length`` (the skip is recorded)."""

    def __init__(self, builder: SequenceBuilder, events: SkipEvents, trust_manifest: bool = True):
        self.builder, self.events, self.trust_manifest = builder, events, trust_manifest

    def __call__(self, cut):
        n = (cut.custom or {}).get("num_tokens") if self.trust_manifest else None
        if not isinstance(n, int) or n <= 0:
            try:
                n = self.builder.count_tokens(cut)
            except SkipSample as e:
                self.events.skip(e)
                return None
        max_length = self.builder.max_length
        if max_length is not None and n > max_length:
            self.events.skip(SkipSample(TOO_LONG_FOR_CONTEXT, f"{n} tokens > max_length {max_length}", cut.id))
            return None
        cut.num_tokens = n
        return cut


def _is_cut(cut) -> bool:
    return cut is not None


def make_constraint(nemo: DictConfig) -> TokenConstraint:
    """Lhotse's ``TokenConstraint`` from NeMo's keys (``batch_tokens`` counts padded tokens)."""
    if nemo.batch_tokens is None and nemo.batch_size is None:
        raise ValueError("set batch_tokens (padded tokens per mini-batch) and/or batch_size (examples per "
                         "mini-batch) in the split's config")
    return TokenConstraint(max_tokens=nemo.batch_tokens, max_examples=nemo.batch_size,
                           quadratic_length=nemo.quadratic_factor)


def make_sampler(cuts: CutSet, nemo: DictConfig, seed: int | str, rank: int, world_size: int,
                 duration_bins: list[float] | None = None):
    """Lhotse's bucketing (``use_bucketing``; bins in tokens) or plain dynamic sampler, NeMo's key names."""
    common = dict(constraint=make_constraint(nemo), shuffle=nemo.shuffle, drop_last=nemo.drop_last, seed=seed,
                  rank=rank, world_size=world_size)
    if nemo.use_bucketing:
        return DynamicBucketingSampler(cuts, num_buckets=nemo.num_buckets, duration_bins=duration_bins,
                                       num_cuts_for_bins_estimate=nemo.num_cuts_for_bins_estimate,
                                       buffer_size=nemo.bucket_buffer_size, shuffle_buffer_size=nemo.shuffle_buffer_size,
                                       concurrent=nemo.concurrent_bucketing, **common)
    return DynamicCutSampler(cuts, shuffle_buffer_size=nemo.shuffle_buffer_size, **common)


def bucket_bins(nemo: DictConfig, measure: Callable[[SkipEvents], CutSet]) -> list[float] | None:
    """``bucket_duration_bins`` (token counts) from the config, or estimated by Lhotse on the first
    ``num_cuts_for_bins_estimate`` examples. The estimate reads its own copy of the stream, whose skips are not
    counted (the training pass counts them)."""
    if not nemo.use_bucketing:
        return None
    if nemo.bucket_duration_bins is not None:
        return [float(b) for b in OmegaConf.to_container(nemo.bucket_duration_bins)]
    sample = islice(measure(SkipEvents()), int(nemo.num_cuts_for_bins_estimate))
    return estimate_duration_buckets(sample, num_buckets=int(nemo.num_buckets), constraint=make_constraint(nemo))


# ---- the loader -----------------------------------------------------------------------------------
class AudexDataLoader:
    """Iterates a torch ``DataLoader`` of :class:`PackedBatch` and does the bookkeeping in the training process:
    counts every skipped cut per reason (bad input in ``skips``, the paper's filters in ``filtered``), stops
    with :class:`~audex.data.skips.TooManySkipsError` above ``max_skip_rate``, drops batches without samples and
    logs a per-reason summary at the end of each pass (or when the pass is abandoned).

    Attributes: ``loader`` (the torch DataLoader), ``sampler``, ``dataset``, ``plan`` (training: the
    :class:`BlendPlan`), ``skips``, ``filtered``.
    """

    def __init__(self, loader, name: str, sampler_events: SkipEvents, max_skip_rate: float | None,
                 min_examples: int = 100, plan: BlendPlan | None = None, sampler=None, dataset=None):
        self.loader = loader
        self.name = name
        self.sampler_events = sampler_events
        self.plan = plan
        self.sampler = sampler
        self.dataset = dataset
        self.accounts = LoaderSkips(name, max_skip_rate=max_skip_rate, min_examples=min_examples)
        self.skips, self.filtered = self.accounts.skips, self.accounts.filtered

    def __iter__(self) -> Iterator[PackedBatch]:
        self.accounts.reset()
        finished = False
        try:
            for batch in self.loader:
                self.accounts.account(batch.skipped + self.sampler_events.drain(), batch.num_samples)
                if batch.num_samples:
                    yield batch
            self.accounts.account(self.sampler_events.drain(), 0)
            finished = True
        finally:
            self.log_summary()
        if finished:
            self.accounts.check()

    def log_summary(self) -> str:
        return self.accounts.log_summary()


def build_dataloader(data_cfg, tokenizer, frames_fn: Callable[[int], int] | None = None, split: str = "train",
                     epoch: int = 0, global_rank: int = 0, world_size: int = 1) -> AudexDataLoader:
    """The loader of ``split`` (``train``, ``val``, ``test``); see the module docstring.

    ``epoch`` re-seeds the blend and the shuffling (the same epoch always gives the same batches, which is what
    an exact mid-epoch resume needs). A training pass draws the whole stage (``BlendPlan.total_samples``); a
    validation pass reads every manifest once.
    """
    options, nemo_raw = split_config(data_cfg, split)
    train = split == "train"
    input_cfg, sources = annotate_input_cfg(nemo_raw.input_cfg, options.blend_epochs, options.manifest_dir,
                                            with_weights=train)
    if not input_cfg:
        raise ValueError(f"split {split!r}: no input_cfg item is drawn (all have 0 epochs?)")
    if train:
        unused = {k for k, e in options.blend_epochs.items() if e > 0} - used_blends(
            OmegaConf.to_container(nemo_raw.input_cfg))
        if unused:
            log.warning("blend_epochs lists %s but no input_cfg item of this data has that blend: not drawn",
                        sorted(unused))
    nemo_raw.input_cfg = input_cfg
    nemo = make_structured_with_schema_warnings(nemo_raw)
    if train and nemo.reweight_temperature not in (None, 1, 1.0):
        raise ValueError("reweight_temperature would change the epochs of the blend: leave it unset")
    plan = BlendPlan(sources) if train and sources else None
    builder = make_builder(options, tokenizer, frames_fn)
    packing = options.packing
    dataset_events, sampler_events = SkipEvents(), SkipEvents()
    dataset = AudexDataset(builder, packing=bool(packing.enabled), pad_to_multiple_of=int(packing.pad_to_multiple_of),
                           events=dataset_events, extra_bins=int(packing.extra_bins))
    name = f"{split} data"

    if not nemo.use_multimodal_sampling:
        loader = _nemo_dataloader(nemo, input_cfg, dataset, global_rank, world_size, epoch)
        return AudexDataLoader(loader, name, sampler_events, options.max_skip_rate,
                               options.min_examples_for_skip_rate, plan, dataset=dataset)

    online = bool(packing.enabled and packing.online)
    # one sampler in this process, split over ranks: every rank uses the same seed
    seed: int | str = "trng" if nemo_raw.get("shard_seed") == "trng" else int(nemo.seed) + int(epoch)
    cuts = _read_cuts(nemo, input_cfg, finite=not train, seed=seed)
    if train:
        cuts = CutSet(FirstCuts(cuts, plan.total_samples))

    def measure(events: SkipEvents) -> CutSet:  # the paper's filters, then the exact length (None = skipped)
        filters = PaperFilters(PaperFilterConfig(**options.filters), tokenizer=tokenizer, counter=events)
        out = cuts.filter(filters).map(MeasureTokens(builder, events, options.trust_manifest_num_tokens), apply_fn=None)
        return out.filter(_is_cut)

    bins = bucket_bins(nemo, measure)
    sampler = make_sampler(measure(sampler_events), nemo, seed, rank=global_rank, world_size=world_size,
                           duration_bins=bins)
    workers = int(nemo.num_workers)
    if online:  # workers build, this process packs: one stream per rank, whatever the number of workers
        chunks = torch.utils.data.DataLoader(SequenceDataset(builder, dataset_events), sampler=sampler,
                                             batch_size=None, num_workers=workers)
        packer = OnlinePacker(int(options.max_length), builder.tokenizer.pad_id, int(packing.buffer_size),
                              int(packing.rows_per_batch), int(packing.pad_to_multiple_of), bool(packing.fixed_length),
                              int(packing.max_carry), extra_bins=int(packing.extra_bins))
        loader = PackedStream(chunks, packer, pin_memory=bool(nemo.pin_memory) and torch.cuda.is_available())
    else:
        loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers,
                                             pin_memory=bool(nemo.pin_memory))
    if plan is not None:
        log.info("%s: %s", name, plan.describe())
    return AudexDataLoader(loader, name, sampler_events, options.max_skip_rate, options.min_examples_for_skip_rate,
                           plan, sampler=sampler, dataset=dataset)


def _nemo_dataloader(nemo: DictConfig, input_cfg: list[dict], dataset: AudexDataset, rank: int, world_size: int,
                     epoch: int):
    """``get_lhotse_dataloader_from_config`` for audio-only blends (``use_multimodal_sampling: false``)."""
    for item in input_cfg:
        _require_audio_source(item)
    cfg = nemo.copy()
    cfg.seed = int(cfg.seed) + int(epoch)
    if isinstance(cfg.shard_seed, int):
        cfg.shard_seed = int(cfg.shard_seed) + int(epoch)
    return get_lhotse_dataloader_from_config(cfg, global_rank=rank, world_size=world_size, dataset=dataset)


def _require_audio_source(item: Mapping) -> None:
    if item.get("type") == "group":
        for child in item.get("input_cfg", []):
            _require_audio_source(child)
        return
    cfg = OmegaConf.create({"input_cfg": [dict(item)], "force_finite": True, "metadata_only": True, "shard_seed": 0})
    first = next(iter(read_cutset_from_config(cfg)[0]), None)
    if first is not None and not first.has_recording:
        raise ValueError(f"input_cfg item {item_name(item)!r} holds {(first.custom or {}).get('task')!r} cuts without "
                         "audio, which NeMo's get_lhotse_dataloader_from_config cannot read (it resamples every cut): "
                         "set use_multimodal_sampling: true")


# ---- the plan of a stage --------------------------------------------------------------------------
def plan_blend(data_cfg, tokenizer, frames_fn: Callable[[int], int] | None = None, split: str = "train") -> BlendPlan:
    """The stage's :class:`BlendPlan` with mean tokens per source, measured on the first ``plan_estimate_cuts``
    examples of each manifest (manifests sorted by length bias this estimate)."""
    options, nemo = split_config(data_cfg, split)
    input_cfg, sources = annotate_input_cfg(nemo.input_cfg, options.blend_epochs, options.manifest_dir)
    builder = make_builder(options, tokenizer, frames_fn)
    leaves = list(leaf_items(input_cfg))
    if len(leaves) != len(sources):
        raise AssertionError("input_cfg items and blend sources are out of step")
    for item, source in zip(leaves, sources):
        cfg = OmegaConf.create({"input_cfg": [item], "force_finite": True, "metadata_only": True, "shard_seed": 0})
        lengths = []
        for cut in islice(read_cutset_from_config(cfg)[0], int(options.plan_estimate_cuts)):
            n = (cut.custom or {}).get("num_tokens") if options.trust_manifest_num_tokens else None
            try:
                lengths.append(n if isinstance(n, int) and n > 0 else builder.count_tokens(cut))
            except SkipSample:
                continue
        if not lengths:
            raise ValueError(f"source {source.name!r}: none of its first {options.plan_estimate_cuts} examples "
                             "could be measured (all skipped): check the manifest")
        source.mean_tokens = sum(lengths) / len(lengths)
    return BlendPlan(sources)
