"""Process-group helpers for the 2-process parallelism tests (gloo on the CPU, file rendezvous, no ports).

``spawn(worker, world_size, tmp_path, *args)`` runs ``worker(rank, world_size, tmp_path, *args)`` in
``world_size`` fresh processes (torch.multiprocessing, spawn) inside an initialised gloo process group; a
worker's exception fails the test. Workers save what they computed with ``torch.save`` under ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, worker, world_size: int, tmp_path: str, args: tuple) -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, Path(tmp_path), *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(worker, world_size: int, tmp_path: Path, *args) -> None:
    mp.spawn(_entry, args=(worker, world_size, str(tmp_path), args), nprocs=world_size, join=True)
