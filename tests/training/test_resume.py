"""A run killed mid-stage resumes with the same weights, AdamW moments, LR schedule and data position: its losses
after the restart equal those of the run that was never interrupted."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from small_manifests import write_small_manifests

ROOT = Path(__file__).resolve().parents[2]


class LossRecorder(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[batch_idx] = float(outputs["loss"])


class CrashAt(Callback):
    """Raise inside the run (mid gradient accumulation), as a killed process would stop: nothing more is saved."""

    def __init__(self, batch_idx):
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return write_small_manifests(tmp_path_factory.mktemp("resume_data"))


def _cfg(manifests, exp_dir):
    overrides = [
        "model=tiny", "data=demo", "trainer=cpu", f"data.manifest_dir={manifests}", "~data.validation_ds",
        "data.max_length=1024", "data.global_batch_size=2", "data.blend_epochs.understanding=0",
        "data.blend_epochs.tta=0", "data.blend_epochs.asr_ast=2", "data.blend_epochs.text=2", "data.blend_epochs.tts=2",
        "trainer.max_steps=6", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "model.optim.lr=1e-3", "model.optim.sched.min_lr=1e-4", "model.text_gate.enabled=false",
        f"exp_manager.exp_dir={exp_dir}", "exp_manager.create_tensorboard_logger=false",
        "exp_manager.checkpoint_callback_params.every_n_train_steps=3",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="stage3", overrides=overrides)


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(manifests, tmp_path):
    from audex.training.run import train_stage

    uninterrupted = LossRecorder()
    train_stage(_cfg(manifests, tmp_path / "a"), callbacks=[uninterrupted])
    assert sorted(uninterrupted.losses) == list(range(12))  # 6 steps x 2 micro-batches

    killed = LossRecorder()
    # step 3 is checkpointed after batch 5; the crash hits batch 9, the 2nd micro-batch of step 5
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_stage(_cfg(manifests, tmp_path / "b"), callbacks=[killed, CrashAt(9)])
    assert sorted(killed.losses) == list(range(9))
    assert list((tmp_path / "b" / "stage3" / "checkpoints").glob("*step=3*.ckpt"))

    resumed = LossRecorder()
    out = train_stage(_cfg(manifests, tmp_path / "b"), callbacks=[resumed])
    assert sorted(resumed.losses) == list(range(6, 12))  # restarted after the checkpoint, not from scratch
    for batch_idx in range(6, 12):
        assert resumed.losses[batch_idx] == pytest.approx(uninterrupted.losses[batch_idx], rel=1e-5, abs=1e-6), batch_idx
    # the losses really moved (a resume to the wrong data position or LR would show)
    assert len({round(v, 4) for v in uninterrupted.losses.values()}) > 6
    assert out.exists()
