"""Lightning's ``ModelParallelStrategy`` with the device mesh of the ``parallelism:`` block (engine ``hf``).

The layout of NeMo 3.0's speechlm2 (``AutomodelParallelStrategy``): Lightning starts the processes and the
process group; the strategy builds one device mesh and hands it to the LightningModule, whose
``configure_model()`` shards itself on it (:func:`audex.parallel.sharding.parallelize_model`). Checkpoints are
torch distributed checkpoints (a folder, one shard per rank: ``save_distributed_checkpoint=True``).

Mesh dimensions, outermost first (tensor parallel innermost, so TP peers are neighbouring ranks of a node)::

    dp_replicate x dp_shard x context_parallel x tensor_parallel       (pipeline = 1 for engine hf)

``dp_shard`` = ``parallelism.fsdp``; ``data_parallel`` = dp_replicate x dp_shard (samplers key on it);
``fsdp`` = dp_shard x context_parallel flattened: FSDP2 shards over it, and gradients average over it
(context-parallel peers hold equal-weight shares of one row, see :func:`audex.parallel.sharding.cp_loss`);
``data_context`` = every data x context rank: MoE expert loads are summed over it.

Example::

    strategy = AudexParallelStrategy(ParallelismConfig(tensor=2))
    Trainer(accelerator="cpu", devices=2, strategy=strategy, ...)
"""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from audex.parallel.config import ParallelismConfig, ParallelismError

MESH_DIMS = ("dp_replicate", "dp_shard", "context_parallel", "tensor_parallel")


def needs_model_parallel(p: ParallelismConfig) -> bool:
    """True when the model itself is split (TP, CP, EP or FSDP); plain data parallelism stays on DDP."""
    return p.tensor > 1 or p.context > 1 or p.expert > 1 or p.fsdp > 1


def data_parallel_rank(global_rank: int, p: ParallelismConfig) -> int:
    """The data-parallel rank of a global rank in :data:`MESH_DIMS` order (context and tensor peers share it)."""
    return global_rank // (p.context * p.tensor * p.pipeline)


def build_device_mesh(p: ParallelismConfig, device_type: str) -> DeviceMesh:
    """The 4-D mesh of :data:`MESH_DIMS` with the flattened ``data_parallel`` and ``fsdp`` groups."""
    if p.world_size is None or p.data is None:
        raise ParallelismError("the device mesh needs parallelism.world_size (the launch's device count)")
    if p.pipeline != 1:
        raise ParallelismError(f"parallelism.pipeline={p.pipeline}: engine hf has no pipeline parallelism; set "
                               "pipeline=1 (or use model.backbone.engine=megatron)")
    shape = (p.data // p.fsdp, p.fsdp, p.context, p.tensor)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("data_parallel")
    mesh["dp_shard", "context_parallel"]._flatten("fsdp")
    mesh["dp_replicate", "dp_shard", "context_parallel"]._flatten("data_context")
    return mesh


class AudexParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose mesh follows ``parallelism`` (its ``world_size`` is checked against the
    launch). The model finds the mesh in ``self.device_mesh`` and the layout in ``self.audex_parallelism``."""

    def __init__(self, parallelism: ParallelismConfig, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=True,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.parallelism = parallelism

    def setup_environment(self) -> None:
        self._setup_distributed()          # accelerator + process group (ParallelStrategy / ModelParallelStrategy)
        given = self.parallelism
        if given.world_size is not None and given.world_size != self.world_size:
            raise ParallelismError(f"parallelism.world_size={given.world_size} but the launch has {self.world_size} "
                                   "processes (trainer.devices x trainer.num_nodes); set world_size=null")
        self.parallelism = ParallelismConfig(**{**given.to_dict(), "world_size": self.world_size})
        self._device_mesh = build_device_mesh(self.parallelism, self.root_device.type)
        module = self.lightning_module
        module._device_mesh = self._device_mesh
        module.audex_parallelism = self.parallelism

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Lightning's sharded save, with the OmegaConf hyper-parameters as plain containers (and no
        ``hparams_type`` class): the metadata file is read back with ``torch.load(weights_only=True)``, which
        refuses OmegaConf classes."""
        checkpoint = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                      for k, v in checkpoint.items() if k != "hparams_type"}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @property
    def distributed_sampler_kwargs(self) -> dict:
        dp = self.device_mesh["data_parallel"]
        return {"num_replicas": dp.size(), "rank": dp.get_local_rank()}
