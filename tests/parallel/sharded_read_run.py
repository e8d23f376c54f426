"""A training stage whose backbone comes from an HF folder, for tests/parallel/test_sharded_read.py:
``python sharded_read_run.py OUT [--rank0-path] [--stop-at-start] OVERRIDES...``.

Runs ``conf/stage2.yaml`` through :func:`audex.training.run.train_stage` with lightning_run's ``Recorder``
(``OUT/losses_rank{R}.json``) and, at the start of training (before any update), writes ``OUT/loaded_rank{R}.json``
(``built_on_meta``, the backbone's ``read_report``, the peak RSS so far in MiB) and, from rank 0, ``OUT/full.pt``:
the whole model's state gathered from the shards plus the rotary buffers; ``OUT/batch_rank{R}.pt``: the
first micro-batch. ``--rank0-path`` turns the
sharded read off (rank 0 loads the folder and broadcasts, the path before it), for the RSS comparison;
``--stop-at-start`` ends the run there.
"""

import json
import resource
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from lightning_run import Recorder

ROOT = Path(__file__).resolve().parents[2]


class StopAtStart(Exception):
    pass


class LoadedState(Callback):
    def __init__(self, out: Path, stop: bool):
        self.out, self.stop = out, stop

    def on_train_start(self, trainer, pl_module):
        from audex.parallel.sharding import gather_full_state

        info = {"built_on_meta": bool(getattr(pl_module, "built_on_meta", False)),
                "read_report": pl_module.llm.read_report,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        (self.out / f"loaded_rank{trainer.global_rank}.json").write_text(json.dumps(info))
        if not self.stop:
            state = gather_full_state(pl_module)          # collective
            if trainer.global_rank == 0:
                buffers = {n: b.detach().cpu() for n, b in pl_module.named_buffers()
                           if n.rpartition(".")[2] in ("inv_freq", "original_inv_freq")}
                torch.save({"state": state, "buffers": buffers}, self.out / "full.pt")
        if self.stop:
            raise StopAtStart("stopped at the start of training (--stop-at-start)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:      # the rows this rank trains on first (data-parallel ranks read their own)
            torch.save(batch, self.out / f"batch_rank{trainer.global_rank}.pt")


def main(argv: list[str]) -> None:
    out, rest = Path(argv[0]), argv[1:]
    rank0_path = "--rank0-path" in rest
    stop = "--stop-at-start" in rest
    rest = [a for a in rest if a not in ("--rank0-path", "--stop-at-start")]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    import audex.training.run as run

    if rank0_path:
        run.reads_backbone_shards = lambda cfg: False
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="stage2", overrides=rest)
    try:
        run.train_stage(cfg, callbacks=[Recorder(out, None), LoadedState(out, stop)])
    except StopAtStart:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
