"""The training progress bar, with the stage's length as its total.

The training loader streams packed rows (online packing over a buffer), so it has no ``len()`` and Lightning's
bar shows ``101/?``. The stage's length is known all the same: ``trainer.max_steps`` optimizer steps (from the
data blend, :func:`audex.training.run.stage_max_steps`) of ``accumulate_grad_batches`` micro-batches each.
:class:`StageProgressBar` is Lightning's ``TQDMProgressBar`` with that count as the epoch's total; a loader
that does have a length keeps Lightning's own total.

Example::

    trainer = Trainer(max_steps=500, accumulate_grad_batches=4, callbacks=[StageProgressBar()])
    trainer.fit(model)      # Epoch 0:  5%|▌  101/2000 [...]
"""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training total is the micro-batches left in the stage when the loader has no
    length: the batches already run in this epoch (a resumed run continues mid-epoch) plus
    ``(max_steps - global_step) * accumulate_grad_batches``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stage_total: int | None = None

    def on_train_epoch_start(self, trainer, *args) -> None:
        self._stage_total = None
        if math.isinf(trainer.num_training_batches) and trainer.max_steps is not None and trainer.max_steps > 0:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            left = max(trainer.max_steps - trainer.global_step, 0) * trainer.accumulate_grad_batches
            self._stage_total = int(done + left)
        super().on_train_epoch_start(trainer, *args)

    @property
    def total_train_batches(self) -> int | float:
        return self._stage_total if self._stage_total is not None else super().total_train_batches
