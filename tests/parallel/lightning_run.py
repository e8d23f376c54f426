"""A training stage for the Lightning parallelism tests:
``python lightning_run.py OUT [--crash-at N] [--stage stage1] OVERRIDES...``.

Composes ``conf/<stage>.yaml`` (default ``stage2``) with the Hydra overrides, runs
:func:`audex.training.run.train_stage`, and writes ``OUT/losses_rank{R}.json``: per micro-batch index, the logged
training loss and a fingerprint of the batch's token ids (TP/CP peers must see the same rows, DP ranks other
ones), and ``OUT/sharding_rank{R}.json`` (DTensor parameters, local rows of the output head). ``--crash-at N`` raises at the start of micro-batch N on every rank, as a killed run stops. Lightning
starts the second process by running this same command line (its subprocess launcher), so ``trainer.devices=2``
is all a 2-process run needs.
"""

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[2]


class Recorder(Callback):
    def __init__(self, out: Path, crash_at: int | None):
        self.out, self.crash_at, self.rows = out, crash_at, {}

    def on_train_start(self, trainer, pl_module):
        """How the model is split on this rank: DTensor parameters and the local rows of the output head."""
        head = pl_module.backbone.get_output_embeddings().weight
        local = head.to_local() if isinstance(head, DTensor) else head
        info = {"dtensors": sum(isinstance(p, DTensor) for p in pl_module.parameters()), "head_rows": local.shape[0],
                "built_on_meta": bool(getattr(pl_module, "built_on_meta", False)),
                # routed experts this rank holds per MoE layer (megatron-core's local experts; 0: dense)
                "local_experts": max((len(m.local_experts) for m in pl_module.modules() if hasattr(m, "local_experts")),
                                     default=0),
                "strategy": type(trainer.strategy).__name__}
        (self.out / f"sharding_rank{trainer.global_rank}.json").write_text(json.dumps(info))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.crash_at:
            raise RuntimeError(f"simulated crash at micro-batch {batch_idx}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = batch.input_ids if hasattr(batch, "input_ids") else batch["input_ids"]
        fingerprint = int((ids.long() * torch.arange(1, ids.numel() + 1).view_as(ids)).sum())
        self.rows[batch_idx] = {"loss": float(trainer.callback_metrics["train_loss"]), "batch": fingerprint,
                                "tokens": int(ids.numel()),  # MegatronStrategy: the last step's global grad norm
                                "grad_norm": getattr(trainer.strategy, "last_grad_norm", None)}
        path = self.out / f"losses_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.rows))


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    crash_at, stage = None, "stage2"
    if rest[:1] == ["--crash-at"]:
        crash_at, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--stage"]:
        stage, rest = rest[1], rest[2:]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    from audex.training.run import train_stage

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name=stage, overrides=rest)
    train_stage(cfg, callbacks=[Recorder(out, crash_at)])


if __name__ == "__main__":
    main(sys.argv[1:])
