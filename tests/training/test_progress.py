"""The training progress bar shows the stage's micro-batch count, not ``?``, for a loader without a length."""

from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from omegaconf import OmegaConf

from audex.training.progress import StageProgressBar
from audex.training.run import build_trainer

ROOT = Path(__file__).resolve().parents[2]


class _Stream(torch.utils.data.IterableDataset):
    """Endless batches and no ``__len__``, like the packed training stream."""

    def __iter__(self):
        while True:
            yield torch.randn(4, 3)


class _Tiny(LightningModule):
    def __init__(self, loader):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.loader = loader

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return self.loader


def _fit(loader, max_steps, accumulate):
    bar = StageProgressBar()
    trainer = Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=[bar], accelerator="cpu",
                      logger=False, enable_checkpointing=False, enable_model_summary=False, max_epochs=-1)
    trainer.fit(_Tiny(loader))
    return bar.train_progress_bar


def test_bar_total_is_the_stages_micro_batches():
    bar = _fit(torch.utils.data.DataLoader(_Stream(), batch_size=None), max_steps=6, accumulate=2)
    assert (bar.n, bar.total) == (12, 12)   # 6 optimizer steps x 2 micro-batches, not "12/?"


def test_a_loader_with_a_length_keeps_lightnings_total():
    loader = torch.utils.data.DataLoader(torch.randn(10, 3), batch_size=2)  # 5 batches per epoch
    bar = _fit(loader, max_steps=7, accumulate=1)
    assert bar.total == 5


def test_build_trainer_uses_the_stage_bar():
    cfg = OmegaConf.create({"trainer": OmegaConf.load(ROOT / "conf/trainer/cpu.yaml"),
                            "data": {"global_batch_size": 2, "packing": {"enabled": True, "rows_per_batch": 1}}})
    trainer = build_trainer(cfg, max_steps=10)
    assert isinstance(trainer.progress_bar_callback, StageProgressBar) and trainer.accumulate_grad_batches == 2
