"""Engine ``megatron`` in :func:`audex.training.run.train_stage`: the launch, megatron-core's parallel state before
the model is built, the strategy, and the ``.nemo`` at the end.

megatron-core builds each rank's shard of the backbone when the model is constructed, reading the TP/EP sizes from
its parallel state, so torch.distributed and that state must exist before :func:`audex.training.run.build_model`.
A launcher that starts every process up front with ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set gives that:
torchrun, megatron's documented launch. Lightning's own subprocess launcher starts ranks > 0 only inside
``trainer.fit``, after the model exists, so it is refused for engine megatron with more than one process::

    python -m torch.distributed.run --nproc_per_node 2 examples/audex_train.py --config-name=stage2 \\
        model=tiny model.backbone.engine=megatron trainer=cpu trainer.devices=2 parallelism.tensor=2

(``torchrun --nnodes N --nproc_per_node G --rdzv-endpoint HOST:PORT ...`` on each node for several nodes;
``trainer.devices`` x ``trainer.num_nodes`` must equal torchrun's world size.) One process without torchrun gets a
one-rank process group of its own (a TCP store on a free local port), torn down after the stage.

The ``.nemo`` of an engine-megatron stage is written from an engine-``hf`` copy of the model: every rank gathers
the TP/EP shards into whole tensors under Hugging Face names (``MegatronCausalLM.state_dict``), rank 0 loads them
into the copy and saves it, so the archive restores in one process without megatron-core's parallel state; a next
stage picks its engine in its own config (``model.init_from`` loads by those names into either engine).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict

from audex.models.audex_model import AudexModel
from audex.parallel.config import ParallelismConfig, ParallelismError
from audex.parallel.megatron_strategy import init_model_parallel

TORCHRUN = "python -m torch.distributed.run --nproc_per_node {n} examples/audex_train.py ... trainer.devices={n}"


def engine_of(cfg: DictConfig) -> str:
    return str(((cfg.get("model") or {}).get("backbone") or {}).get("engine", "hf"))


def check_megatron_layout(p: ParallelismConfig) -> None:
    """What engine megatron's path through ``train_stage`` cannot do, refused with the key to change."""
    if p.pipeline > 1:
        raise ParallelismError("parallelism.pipeline > 1: engine megatron runs the whole backbone in every process "
                               "(AudexModel has no pipeline schedule); set pipeline=1")
    if p.context > 1:
        raise ParallelismError("parallelism.context > 1: engine megatron's backbone does not cut packed rows into "
                               "context-parallel shares; set context=1, or use model.backbone.engine=hf for CP")
    if p.fsdp > 1:
        raise ParallelismError("parallelism.fsdp > 1 is engine hf's FSDP2; engine megatron replicates over the "
                               "data-parallel ranks (megatron DDP): set fsdp=1")


def uses_megatron_strategy(cfg: DictConfig, p: ParallelismConfig | None) -> bool:
    """Engine megatron, one process or many: ``MegatronStrategy`` (megatron DDP's grad buffers and
    ``finalize_model_grads``, which also moves the MoE routers' expert bias once per optimizer step)."""
    return engine_of(cfg) == "megatron"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_parallel_state(cfg: DictConfig, p: ParallelismConfig) -> bool:
    """For engine megatron: check the launch, then initialise torch.distributed (if needed) and megatron-core's
    parallel state with ``p``, and hand ``p`` to the backbone (``model.backbone.parallelism``, so sequence
    parallelism reaches it). Returns True when this call created the process group (:func:`stop_parallel_state`
    then destroys it). No-op (False) for engine hf."""
    if engine_of(cfg) != "megatron":
        return False
    check_megatron_layout(p)
    world = p.world_size or 1
    torchrun = TorchElasticEnvironment.detect()
    if world > 1 and not torchrun:
        raise ParallelismError(
            f"engine megatron with {world} processes (trainer.devices x trainer.num_nodes) builds its sharded "
            "backbone before the Trainer exists, so every process must be running from the start: launch with "
            f"torchrun, e.g. `{TORCHRUN.format(n=world)}` (Lightning's own launcher starts the other ranks too late)")
    if torchrun and int(os.environ["WORLD_SIZE"]) != world:
        raise ParallelismError(f"torchrun started {os.environ['WORLD_SIZE']} processes but trainer.devices x "
                               f"trainer.num_nodes = {world}: make them equal")
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    backend = "nccl" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()) \
        else "gloo"
    created = not dist.is_initialized()
    if created and not torchrun:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    init_model_parallel(p, seed=int(cfg.get("seed", 1234)), backend=backend)
    with open_dict(cfg.model):
        cfg.model.backbone.parallelism = p.to_dict()
    return created


def stop_parallel_state(created: bool) -> None:
    """Destroy megatron-core's parallel state, and the process group when :func:`start_parallel_state` made it."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if created and dist.is_initialized():
        dist.destroy_process_group()


def engine_hf_copy(model, is_rank_zero: bool):
    """Every rank: gather the model's whole state (a collective over TP/EP); rank 0: an engine-``hf``
    ``AudexModel`` of the same config holding it (other ranks: None)."""
    state = model.state_dict()
    if not is_rank_zero:
        return None
    cfg = OmegaConf.create(OmegaConf.to_container(model.cfg, resolve=False))
    with open_dict(cfg):
        cfg.backbone.engine = "hf"
        cfg.backbone.pop("parallelism", None)
    copy = AudexModel(cfg)
    copy.load_state_dict(state)
    return copy
