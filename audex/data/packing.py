"""Online sequence packing with a balanced greedy knapsack (section 4.5 of the paper).

Audex trains on rows of up to ``max_length`` tokens (262,144 in the paper) that each hold several samples.
The paper packs online, as Nemotron 3 Nano Omni does: samples stream into a buffer of 8,192, the buffer is
packed with a *balanced greedy knapsack*, and the packed rows go to the model. A packed row keeps its samples
apart (``position_ids`` restart, ``sample_ids`` mark the samples, see :mod:`audex.data.collate`).

**The algorithm** (:func:`pack_balanced_greedy`): open ``num_bins`` empty bins (default: the lower bound
``ceil(sum(lengths) / max_length)``), take the samples longest first, and put each into the *least-filled*
bin; when even that bin has no room, no bin has, and a new bin is opened. This is worst-fit decreasing
with a preset number of bins, i.e. LPT scheduling under a capacity: the long samples are spread one per bin
and the many short ones level the bins out, so the bins end up nearly equally full. Equal rows mean equal
work per data-parallel rank, which is what "balanced" buys over first-fit. A heap keeps the least-filled bin
at hand: O(n log n) for n samples, ~30 ms for a buffer of 8,192.

**Extra bins** (``extra_bins``, Megatron-LM's ``delta`` in ``balanced_greedy_knapsack``,
``examples/multimodal/data_loading/knapsacks.py``, default 20 there): open that many bins beyond the lower
bound. The rows then hold ``sum / (bins + delta)`` tokens each instead of being filled to the brim: more rows,
each less full and closer to one another (with few, long samples the last bins otherwise end up part-empty).
Audex's default is 0: the held-back overflow below already evens the rows out. ``bench/packing.py`` measures
what ``delta`` costs: on the paper's mix (~33 rows of 262,144 per 8,192-sample buffer) the real-token share
goes 0.994 / 0.883 / 0.633 for delta 0 / 5 / 20; it pays off only where a buffer makes many short rows.

**Online** (:class:`OnlinePacker`): the buffer is packed into ``floor(sum / max_length)`` bins, one fewer
than the lower bound, so that the kept bins are filled to the brim; what does not fit (the overflow bins,
and the rows that do not make a whole micro-batch) goes back into the buffer and is packed with the next
8,192 samples. A sample goes back at most ``max_carry`` times, and the end of the stream flushes everything,
so no sample is ever lost. On the paper's length mix this keeps > 99 % of the positions real tokens
(``bench/packing.py``).

Why hand-written: the libraries in use do not have it. Lhotse's ``CutConcatenate`` glues *audio* cuts
(shortest to longest, one output length); NeMo's Lhotse loader packs nothing for decoder-only SFT; the
``binpacking`` package either fixes the number of bins without a capacity or minimises bins without
balancing them; Megatron-LM's multimodal ``greedy_knapsack`` fills one knapsack at a time (unbalanced) and
Megatron-Energon, which the paper used, is not a dependency of Audex.

Example::

    >>> pack_balanced_greedy([900, 700, 500, 400, 300, 100], max_length=1000)   # 3 bins, all full
    [[0, 5], [1, 4], [2, 3]]
    >>> pack_balanced_greedy([900, 700, 500, 400, 300, 200], max_length=1000)   # 200 fits nowhere: a 4th bin
    [[0], [1, 4], [2, 3], [5]]
    >>> packer = OnlinePacker(max_length=262144, pad_id=tokenizer.pad_id, buffer_size=8192)
    >>> for batch in packer(sequences):         # an iterable of BuiltSequence
    ...     model(input_ids=batch.input_ids, position_ids=batch.position_ids, sample_ids=batch.sample_ids, ...)
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from audex.data.collate import PackedBatch, collate_rows
from audex.data.sequence import BuiltSequence
from audex.data.skips import TOO_LONG_FOR_CONTEXT, SkipSample

PAPER_PACKING_BUFFER = 8192
PAPER_CONTEXT_LENGTH = 262144


def pack_balanced_greedy(lengths: Sequence[int], max_length: int, num_bins: int | None = None,
                         extra_bins: int = 0) -> list[list[int]]:
    """Pack items of ``lengths`` into bins of capacity ``max_length`` (see the module docstring).

    Args:
        lengths: positive item sizes (tokens).
        max_length: bin capacity; an item longer than this is an error (skip it before packing).
        num_bins: bins opened up front; default ``ceil(sum(lengths) / max_length)``, the fewest possible.
            More bins are opened when items do not fit; bins left empty are dropped.
        extra_bins: bins opened up front beyond ``num_bins`` (Megatron's ``delta``).

    Returns:
        Item indices per bin, each bin in placement order (longest item first); every index appears once.
        Ties go to the lower bin and the earlier item, so the result is deterministic.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ValueError(f"item {i} has length {n}; packing needs positive lengths")
        if n > max_length:
            raise ValueError(f"item {i} has {n} tokens, more than max_length={max_length}: skip it before packing")
    if not lengths:
        return []
    if num_bins is None:
        num_bins = math.ceil(sum(lengths) / max_length)
    elif num_bins < 0:
        raise ValueError(f"num_bins must be >= 0, got {num_bins}")
    if extra_bins < 0:
        raise ValueError(f"extra_bins must be >= 0, got {extra_bins} (data.packing.extra_bins)")
    num_bins += extra_bins
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    heap: list[tuple[int, int]] = [(0, b) for b in range(num_bins)]  # (fill, bin index), least-filled on top
    for i in order:
        n = lengths[i]
        # the least-filled bin has the most room: if the item does not fit there, it fits nowhere
        if heap and heap[0][0] + n <= max_length:
            fill, b = heap[0]
            heapq.heapreplace(heap, (fill + n, b))
        else:
            b = len(bins)
            bins.append([])
            heapq.heappush(heap, (n, b))
        bins[b].append(i)
    return [b for b in bins if b]


@dataclass
class _Pending:
    seq: BuiltSequence
    carried: int = 0


class OnlinePacker:
    """Stream of :class:`~audex.data.sequence.BuiltSequence` -> stream of packed :class:`PackedBatch`.

    Args:
        max_length: tokens per row (the context length).
        pad_id: ``<pad>`` id for the padding at the end of a row.
        buffer_size: samples buffered before packing (8,192 in the paper).
        rows_per_batch: packed rows per yielded micro-batch.
        pad_to_multiple_of: round the row length up to a multiple of this.
        fixed_length: pad every batch to exactly ``max_length`` (static shapes) instead of its longest row.
        max_carry: how often a sample may be held back for a better fit before it is emitted anyway.
        extra_bins: bins opened beyond the count each packing round aims at (Megatron's ``delta``); the rows
            come out less full and more even.
        on_skip: called with a :class:`~audex.data.skips.SkipSample` for every sample longer than
            ``max_length`` (``too_long_for_context``); such samples are dropped, everything else is kept.

    Example::

        >>> packer = OnlinePacker(max_length=4096, pad_id=tok.pad_id, buffer_size=256, rows_per_batch=2)
        >>> batches = list(packer(builder(c) for c in cuts))
        >>> sum(b.num_samples for b in batches) == len(cuts)
        True
    """

    def __init__(self, max_length: int, pad_id: int, buffer_size: int = PAPER_PACKING_BUFFER,
                 rows_per_batch: int = 1, pad_to_multiple_of: int = 1, fixed_length: bool = False,
                 max_carry: int = 2, on_skip: Callable[[SkipSample], None] | None = None, extra_bins: int = 0):
        if max_length <= 0 or buffer_size <= 0 or rows_per_batch <= 0 or max_carry < 0 or extra_bins < 0:
            raise ValueError("OnlinePacker needs max_length, buffer_size, rows_per_batch > 0 and max_carry, "
                             f"extra_bins >= 0; got {max_length}, {buffer_size}, {rows_per_batch}, {max_carry}, "
                             f"{extra_bins}")
        if fixed_length and max_length % pad_to_multiple_of:
            raise ValueError(f"fixed_length rows of max_length={max_length} cannot be padded to a multiple of "
                             f"{pad_to_multiple_of}")
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self.buffer_size = int(buffer_size)
        self.rows_per_batch = int(rows_per_batch)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.fixed_length = bool(fixed_length)
        self.max_carry = int(max_carry)
        self.on_skip = on_skip
        self.extra_bins = int(extra_bins)

    def __call__(self, sequences: Iterable[BuiltSequence]) -> Iterator[PackedBatch]:
        for rows in self.pack_rows(sequences):
            yield self.collate(rows)

    def collate(self, rows: list[list[BuiltSequence]]) -> PackedBatch:
        return collate_rows(rows, self.pad_id, self.pad_to_multiple_of,
                            length=self.max_length if self.fixed_length else None)

    def pack_rows(self, sequences: Iterable[BuiltSequence]) -> Iterator[list[list[BuiltSequence]]]:
        """Like ``__call__`` but yields each micro-batch as rows of sequences (no tensors are made)."""
        buffer: list[_Pending] = []
        for seq in sequences:
            if len(seq) > self.max_length:
                if self.on_skip is None:
                    raise SkipSample(TOO_LONG_FOR_CONTEXT, f"{len(seq)} tokens > max_length {self.max_length}",
                                     seq.cut_id)
                self.on_skip(SkipSample(TOO_LONG_FOR_CONTEXT, f"{len(seq)} tokens > packing max_length "
                                        f"{self.max_length}", seq.cut_id))
                continue
            buffer.append(_Pending(seq))
            if len(buffer) >= self.buffer_size:
                batches, buffer = self._pack(buffer, final=False)
                yield from batches
        if buffer:
            batches, _ = self._pack(buffer, final=True)
            yield from batches

    def _pack(self, buffer: list[_Pending], final: bool) -> tuple[list[list[list[BuiltSequence]]], list[_Pending]]:
        """Pack the buffer; returns the micro-batches to emit and the samples held back for the next round."""
        lengths = [len(p.seq) for p in buffer]
        total = sum(lengths)
        # one bin fewer than the lower bound: the kept bins are full, the overflow waits for the next buffer
        num_bins = math.ceil(total / self.max_length) if final else max(1, total // self.max_length)
        num_bins += self.extra_bins
        bins = pack_balanced_greedy(lengths, self.max_length, num_bins)
        keep: list[list[int]] = []
        held: list[int] = []
        for i, b in enumerate(bins):
            overflow = i >= num_bins
            if overflow and not final and any(buffer[j].carried < self.max_carry for j in b):
                held.extend(b)
            else:
                keep.append(b)
        extra = len(keep) % self.rows_per_batch
        if not final and extra:
            # whole micro-batches only: the emptiest bins that may still wait go back to the buffer
            can_wait = [b for b in keep if any(buffer[j].carried < self.max_carry for j in b)]
            if len(can_wait) >= extra:
                can_wait.sort(key=lambda b: sum(lengths[j] for j in b))
                for b in can_wait[:extra]:
                    keep.remove(b)
                    held.extend(b)
        rows = [[buffer[j].seq for j in b] for b in keep]
        batches = [rows[k:k + self.rows_per_batch] for k in range(0, len(rows), self.rows_per_batch)]
        carried = [_Pending(buffer[j].seq, buffer[j].carried + 1) for j in held]
        return batches, carried
