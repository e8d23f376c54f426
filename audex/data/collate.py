"""The batch the model and the loss see: rows of one or more samples -> :class:`PackedBatch` tensors.

One type for both ways of batching, so that the model, the loss and the logging treat them alike:

* **padded** (:func:`collate_padded`): one sample per row, right-padded to the longest row;
* **packed** (:func:`collate_rows` with several samples per row, rows from :mod:`audex.data.packing`):
  samples are concatenated in a row; ``position_ids`` restart at 0 for every sample and ``sample_ids``
  number the samples of a row (0, 1, 2, ...; -1 on padding). ``AudexModel.forward`` turns ``sample_ids``
  into a block-diagonal causal mask (no attention across samples) and ``audex.parts.losses`` into the
  per-sample sums of the square-averaging loss, eq. (2); a target that starts a new sample is never trained.

``labels`` are the samples' unshifted labels (-100 = not trained; padding is -100). ``audios`` lists the
clips in row-major order of appearance: row 0's samples in row order, each sample's clips in its own order,
then row 1, ... -- the order in which ``AudexModel.embed_inputs`` counts the runs of ``<so_embedding>``.

Example::

    >>> batch = collate_padded([seq_a, seq_b], pad_id=tokenizer.pad_id)        # 2 rows
    >>> packed = collate_rows([[seq_a, seq_b]], pad_id=tokenizer.pad_id)       # 1 row, 2 samples
    >>> packed.sample_ids[0, len(seq_a)], packed.position_ids[0, len(seq_a)]
    (tensor(1), tensor(0))
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from audex.data.sequence import IGNORE_INDEX, BuiltSequence

PADDING_SAMPLE_ID = -1


def batch_field(batch, name: str, default=None):
    """``batch.name`` (a :class:`PackedBatch`) or ``batch[name]`` (a dict with the same fields)."""
    if isinstance(batch, dict):
        return batch.get(name, default)
    return getattr(batch, name, default)


@dataclass
class PackedBatch:
    """A micro-batch of ``B`` rows of length ``L`` (see the module docstring).

    ``cut_ids``, ``tasks`` and ``num_audio_frames`` follow the samples in row-major order; ``skipped`` holds
    ``(reason, detail, cut_id)`` of the cuts that were dropped while this batch was made (the data loader
    counts them in the main process, also when the batch was made in a worker).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    sample_ids: torch.Tensor
    audios: list[torch.Tensor]
    num_samples: int
    cut_ids: list[str]
    tasks: list[str]
    num_audio_frames: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_real_tokens(self) -> int:
        """Tokens that belong to a sample (not padding)."""
        return int(self.sample_ids.ge(0).sum())

    @property
    def real_token_share(self) -> float:
        """Real tokens / all positions of the ``[B, L]`` tensors."""
        return self.num_real_tokens / max(1, self.input_ids.numel())

    @property
    def samples_per_row(self) -> list[int]:
        return (self.sample_ids.amax(dim=1) + 1).tolist()

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor (audios included) on ``device``."""
        return replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device),
                       position_ids=self.position_ids.to(device), sample_ids=self.sample_ids.to(device),
                       audios=[a.to(device) for a in self.audios])

    def pin_memory(self) -> "PackedBatch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return replace(self, input_ids=self.input_ids.pin_memory(), labels=self.labels.pin_memory(),
                       position_ids=self.position_ids.pin_memory(), sample_ids=self.sample_ids.pin_memory(),
                       audios=[a.pin_memory() for a in self.audios])


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate_rows(rows: Sequence[Sequence[BuiltSequence]], pad_id: int, pad_to_multiple_of: int = 1,
                 length: int | None = None) -> PackedBatch:
    """Rows of samples -> :class:`PackedBatch`; a row holds one sample (padded batch) or several (packed).

    Args:
        rows: each row's samples, in the order they are laid out.
        pad_id: the tokenizer's ``<pad>`` id, written on padding positions of ``input_ids``.
        pad_to_multiple_of: round ``L`` (the longest row) up to a multiple of this (8 or 64 suit GPU kernels).
        length: a fixed ``L`` instead (e.g. ``max_length`` for static shapes); a longer row is an error.
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("collate_rows needs at least one row and no empty row")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    row_lengths = [sum(len(s) for s in row) for row in rows]
    if length is None:
        length = _round_up(max(row_lengths), pad_to_multiple_of)
    elif max(row_lengths) > length:
        raise ValueError(f"a row holds {max(row_lengths)} tokens, more than the fixed length {length}: pack with "
                         f"max_length <= {length}")
    B = len(rows)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, length), dtype=torch.long)
    sample_ids = torch.full((B, length), PADDING_SAMPLE_ID, dtype=torch.long)
    positions = torch.arange(length)
    audios: list[torch.Tensor] = []
    cut_ids: list[str] = []
    tasks: list[str] = []
    frames: list[int] = []
    for b, row in enumerate(rows):
        start = 0
        for j, seq in enumerate(row):
            n = len(seq)
            if seq.labels.shape != seq.input_ids.shape:
                raise ValueError(f"cut {seq.cut_id!r}: labels {tuple(seq.labels.shape)} and input_ids "
                                 f"{tuple(seq.input_ids.shape)} differ in shape")
            end = start + n
            input_ids[b, start:end] = seq.input_ids
            labels[b, start:end] = seq.labels
            position_ids[b, start:end] = positions[:n]
            sample_ids[b, start:end] = j
            start = end
            audios.extend(seq.audios)
            cut_ids.append(seq.cut_id)
            tasks.append(seq.task)
            frames.extend(seq.num_audio_frames)
    return PackedBatch(input_ids=input_ids, labels=labels, position_ids=position_ids, sample_ids=sample_ids,
                       audios=audios, num_samples=len(cut_ids), cut_ids=cut_ids, tasks=tasks,
                       num_audio_frames=frames)


def collate_padded(sequences: Sequence[BuiltSequence], pad_id: int, pad_to_multiple_of: int = 1) -> PackedBatch:
    """One sample per row, right-padded: the unpacked batch (e.g. for Mamba backbones, which refuse packed rows)."""
    return collate_rows([[s] for s in sequences], pad_id, pad_to_multiple_of)
