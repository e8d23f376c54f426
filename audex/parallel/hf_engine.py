"""Engine ``hf``: the ``parallelism:`` sizes applied to a transformers backbone with torch-native parallelism.

* tensor parallelism: transformers' own plans (``base_model_tp_plan`` of each architecture) through
  ``DistributedConfig``, applied by ``from_pretrained`` while the weights load sharded
  (:func:`load_tensor_parallel`);
* FSDP2: torch's ``fully_shard`` on every decoder layer and then on the whole model (:func:`fully_shard_backbone`),
  the layout NeMo speechlm2 and torchtitan use;
* context parallelism over packed rows: :mod:`audex.parallel.context_parallel`.

Not here yet: sequence parallelism (transformers 5.24 reserves ``DistributedConfig.enable_sequence_parallel``
and documents it as "not wired up yet"; a written DTensor plan is the next step) and expert parallelism for
Nemotron-H (``DistributedConfig(ep_size=...)``). Both are refused with a clear error rather than ignored.

Example (every rank of a 2-process group)::

    lm = load_tensor_parallel("backbone_folder", ParallelismConfig(world_size=2, tensor=2))
    fully_shard_backbone(lm, init_device_mesh("cpu", (2,)))      # or FSDP2 over 2 data-parallel ranks
"""

from __future__ import annotations

from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from audex.parallel.config import ParallelismConfig


def distributed_config(p: ParallelismConfig) -> DistributedConfig:
    """transformers' ``DistributedConfig`` for the tensor-parallel part of ``p``."""
    if p.sequence:
        raise NotImplementedError("parallelism.sequence=true is not built for engine hf yet: transformers 5.24 "
                                  "reserves DistributedConfig.enable_sequence_parallel but does not wire it; use "
                                  "sequence=false (TP without SP)")
    if p.expert > 1:
        raise NotImplementedError("parallelism.expert > 1 is not built for engine hf yet; use expert=1")
    return DistributedConfig(tp_size=p.tensor)


def load_tensor_parallel(folder: str, p: ParallelismConfig, dtype=None):
    """A causal LM from a local Hugging Face folder, its weights loaded as this rank's TP shards (DTensors)."""
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                distributed_config=distributed_config(p))


def decoder_layers(lm):
    """The repeated blocks of a transformers causal LM (``model.layers`` for Llama and Nemotron-H)."""
    layers = getattr(lm.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no base_model.layers to shard with FSDP2")
    return layers


def fully_shard_backbone(lm, mesh, reshard_after_forward: bool = True):
    """FSDP2 over ``mesh`` (the data-parallel ranks): each decoder layer is one unit, the rest (embeddings,
    final norm, head) the root unit. Gradients are averaged over the mesh, as DDP does."""
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(lm, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return lm
