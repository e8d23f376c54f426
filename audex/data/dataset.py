"""Lhotse-style datasets: a mini-batch of cuts -> built sequences -> a :class:`~audex.data.collate.PackedBatch`.

The sampler stays in the training process and hands ``CutSet`` mini-batches to the dataloader workers, which
run the expensive part -- audio decoding (``cut.load_audio()`` inside the builder), tokenisation, codec ids --
as NeMo's speechlm2 datasets do. Then:

* :class:`AudexDataset` (``dataset[cuts] -> PackedBatch``) pads one sample per row, or packs the mini-batch
  into rows with :func:`~audex.data.packing.pack_balanced_greedy`;
* :class:`SequenceDataset` (``dataset[cuts] -> SequenceChunk``) only builds, and :class:`PackedStream` packs
  the stream of chunks *online* in the training process with an :class:`~audex.data.packing.OnlinePacker`
  (the paper's 8,192-sample buffer). Packing where the sampler is keeps one stream per rank: the order does
  not depend on the number of workers, and no worker re-reads what another one read.

Bad cuts never crash a run: every :class:`~audex.data.skips.SkipSample` is recorded in a :class:`SkipEvents`
and travels with the next chunk or batch (``.skipped``) to the training process, where
:class:`~audex.data.loader.AudexDataLoader` counts it (:class:`~audex.data.skips.LoaderSkips`), logs a per-reason summary at the end of the pass and
stops with a clear error above ``max_skip_rate``. A batch whose cuts were all skipped comes out empty
(``num_samples == 0``), carrying only its skips; the loader drops it.

Example::

    >>> dataset = AudexDataset(SequenceBuilder(tok, frames_fn, max_length=4096), packing=True)
    >>> batch = dataset[cuts]                      # PackedBatch of the cuts that could be built
    >>> chunks = DataLoader(SequenceDataset(builder), sampler=sampler, batch_size=None, num_workers=4)
    >>> for batch in PackedStream(chunks, OnlinePacker(4096, tok.pad_id, buffer_size=8192)):
    ...     ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from lhotse.cut import Cut

from audex.data.collate import PackedBatch, collate_padded, collate_rows
from audex.data.packing import OnlinePacker, pack_balanced_greedy
from audex.data.sequence import BuiltSequence, SequenceBuilder
from audex.data.skips import SkipEvents, SkipRecord, SkipSample


def empty_batch(skipped: list[SkipRecord]) -> PackedBatch:
    """A batch without samples that only carries skip records (the loader counts them and drops it)."""
    z = torch.zeros((0, 0), dtype=torch.long)
    return PackedBatch(input_ids=z, labels=z.clone(), position_ids=z.clone(), sample_ids=z.clone(), audios=[],
                       num_samples=0, cut_ids=[], tasks=[], skipped=skipped)


@dataclass
class SequenceChunk:
    """The sequences built from one sampled mini-batch, and the skips met on the way."""

    sequences: list[BuiltSequence]
    skipped: list[SkipRecord] = field(default_factory=list)


class SequenceDataset(torch.utils.data.Dataset):
    """``dataset[cuts] -> SequenceChunk``: the cuts' sequences; a cut that raises ``SkipSample`` is recorded.

    Example::

        >>> ds = SequenceDataset(SequenceBuilder(AudexTokenizer.build_tiny(), max_length=2048))
        >>> chunk = ds[CutSet.from_file("demo_data/manifests/text_val.jsonl.gz").subset(first=4)]
        >>> len(chunk.sequences), chunk.skipped
        (4, [])
    """

    def __init__(self, builder: SequenceBuilder, events: SkipEvents | None = None):
        self.builder = builder
        self.events = events if events is not None else SkipEvents()

    def build(self, cuts: Iterable[Cut]) -> list[BuiltSequence]:
        out = []
        for cut in cuts:
            try:
                out.append(self.builder(cut))
            except SkipSample as e:
                self.events.skip(e.with_cut_id(cut.id))
        return out

    def __getitem__(self, cuts: Iterable[Cut]) -> SequenceChunk:
        sequences = self.build(cuts)
        return SequenceChunk(sequences, self.events.drain())


class AudexDataset(SequenceDataset):
    """``dataset[cuts] -> PackedBatch`` (Lhotse's dataset protocol: the sampler yields the ``CutSet``).

    Args:
        builder: the :class:`~audex.data.sequence.SequenceBuilder` (tokenizer, ``frames_fn``, ``max_length``).
        packing: pack the mini-batch into rows of ``builder.max_length`` (True) or pad one sample per row.
        pad_to_multiple_of: round the row length up to a multiple of this.
        events: where skips are recorded (a fresh :class:`SkipEvents` by default).

    Example::

        >>> ds = AudexDataset(SequenceBuilder(AudexTokenizer.build_tiny(), max_length=2048), packing=False)
        >>> ds[CutSet.from_file("demo_data/manifests/text_val.jsonl.gz").subset(first=4)].input_ids.shape[0]
        4
    """

    def __init__(self, builder: SequenceBuilder, packing: bool = False, pad_to_multiple_of: int = 1,
                 events: SkipEvents | None = None, extra_bins: int = 0):
        if packing and builder.max_length is None:
            raise ValueError("packing needs the builder's max_length (the row length); got max_length=None")
        super().__init__(builder, events)
        self.packing = packing
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.pad_id = int(builder.tokenizer.pad_id)
        self.extra_bins = int(extra_bins)

    def collate(self, sequences: list[BuiltSequence]) -> PackedBatch:
        if not sequences:
            return empty_batch([])
        if self.packing:
            bins = pack_balanced_greedy([len(s) for s in sequences], self.builder.max_length,
                                        extra_bins=self.extra_bins)
            return collate_rows([[sequences[i] for i in b] for b in bins], self.pad_id, self.pad_to_multiple_of)
        return collate_padded(sequences, self.pad_id, self.pad_to_multiple_of)

    def __getitem__(self, cuts: Iterable[Cut]) -> PackedBatch:
        chunk = super().__getitem__(cuts)
        batch = self.collate(chunk.sequences)
        batch.skipped = chunk.skipped
        return batch


class PackedStream:
    """Online packing in the training process: chunks of built sequences -> packed :class:`PackedBatch` es.

    Args:
        chunks: a re-iterable source of :class:`SequenceChunk` (a ``DataLoader`` over a :class:`SequenceDataset`).
        packer: buffers, packs and collates; a sequence longer than its ``max_length`` is recorded as a skip.
        pin_memory: pin each batch (for a fast copy to the GPU).

    Each batch carries the skips recorded since the previous one; skips after the last batch come in an empty
    batch.
    """

    def __init__(self, chunks: Iterable[SequenceChunk], packer: OnlinePacker, pin_memory: bool = False):
        self.chunks = chunks
        self.packer = packer
        self.pin_memory = pin_memory

    def __iter__(self) -> Iterator[PackedBatch]:
        pending: list[SkipRecord] = []
        events = SkipEvents()
        packer = self.packer
        packer = OnlinePacker(packer.max_length, packer.pad_id, packer.buffer_size, packer.rows_per_batch,
                              packer.pad_to_multiple_of, packer.fixed_length, packer.max_carry, on_skip=events.skip)

        def sequences() -> Iterator[BuiltSequence]:
            for chunk in self.chunks:
                pending.extend(chunk.skipped)
                yield from chunk.sequences

        for rows in packer.pack_rows(sequences()):
            batch = packer.collate(rows)
            batch.skipped = pending[:] + events.drain()
            pending.clear()
            yield batch.pin_memory() if self.pin_memory else batch
        rest = pending + events.drain()
        if rest:
            yield empty_batch(rest)
