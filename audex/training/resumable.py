"""A training dataloader that resumes mid-epoch at the exact batch where a killed run stopped.

Lightning saves the state of any train dataloader that has ``state_dict``/``load_state_dict`` into its
checkpoints and restores it before iteration starts (``CombinedLoader._state_dicts``). :class:`ResumableLoader`
wraps the data pipeline's loader and records (epoch, batches consumed in the epoch). On restore it re-creates
the epoch's iteration -- the sampler is seeded by epoch, so the order is the same -- and drops the batches
already trained on. "Consumed" means *trained on*: Lightning prefetches one batch ahead to detect the end of an
epoch, so the count is set by the :class:`ExactResume` callback as each batch starts, not by how many batches
were pulled.

Skipping re-reads the skipped batches once (seconds for the demo; for very large runs a Lhotse sampler's own
``state_dict`` fast-forward would skip without loading audio). Everything else that decides a step's loss --
weights, AdamW moments, the LR schedule position, the gradient-accumulation phase -- is already in Lightning's
checkpoint; the tiny and real Audex models have no dropout at these stages, so no RNG state is involved.

Example::

    loader = ResumableLoader(lambda epoch: build_dataloader(cfg, tok, frames_fn, "train", epoch=epoch))
    trainer = Trainer(callbacks=[ExactResume()], ...)
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class ResumableLoader:
    """Iterable of batches with Lightning's ``state_dict``/``load_state_dict`` protocol.

    Args:
        make_epoch: ``epoch -> iterable of batches``; the same epoch must give the same batches in the same order.
        num_batches: batches per epoch, if known (then Lightning needs no look-ahead and can size the schedule).
    """

    def __init__(self, make_epoch: Callable[[int], Iterable], num_batches: int | None = None):
        self.make_epoch = make_epoch
        self.num_batches = num_batches
        self.epoch = 0
        self.consumed = 0
        self._skip = 0
        self._finished = False

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this ResumableLoader does not know its number of batches per epoch")
        return self.num_batches

    def __iter__(self) -> Iterator:
        if self._finished:  # the previous epoch ran to its end: this is the next one
            self.epoch, self.consumed, self._finished = self.epoch + 1, 0, False
        skip, self._skip = self._skip, 0
        if skip:
            log.info("resuming epoch %d: skipping the %d batches already trained on", self.epoch, skip)
        self.consumed = skip
        for i, batch in enumerate(self.make_epoch(self.epoch)):
            if i < skip:
                continue
            yield batch
        self._finished = True

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.consumed = self._skip = int(state["consumed"])
        self._finished = False


class ExactResume(Callback):
    """Makes a mid-epoch checkpoint resume at the batch after the last one trained. Add it to the trainer
    (``train_stage`` does).

    * It records, as each batch starts, how many batches of the epoch are consumed, in every
      :class:`ResumableLoader` of the trainer (Lightning pulls one batch ahead, so the loader itself cannot tell).
    * Lightning's step-interval checkpoints are written inside ``on_train_batch_end``, before the batch counts as
      completed; restored as they are, the run would repeat the last batch's index and step the optimizer one
      micro-batch early (with gradient accumulation). The batch is finished at that point -- weights, optimizer
      and LR schedule have all been updated -- so the checkpoint records it as completed.
    """

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if isinstance(loader, ResumableLoader):
                loader.consumed = batch_idx + 1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if not progress:
            return
        for scope in ("total", "current"):
            counts = progress[scope]
            if counts["processed"] > counts["completed"]:
                counts["completed"] = counts["processed"]
