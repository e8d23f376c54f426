"""Engine ``hf``: the ``parallelism:`` sizes applied to a transformers backbone with torch-native parallelism.

* tensor parallelism: transformers' own plans (``base_model_tp_plan`` of each architecture) through
  ``DistributedConfig``, applied by ``from_pretrained`` while the weights load sharded
  (:func:`load_tensor_parallel`);
* sequence parallelism: transformers 5.24 reserves ``DistributedConfig.enable_sequence_parallel`` but documents
  it as "not wired up yet", so :data:`LLAMA_SP_PLAN` writes Megatron's SP layout as a ``tp_plan`` of
  transformers' own styles plus two small boundary styles (the row enters the layers as sequence shards, whether
  given as token ids or as embeddings with audio merged in; each block gathers its input).
  Norm weights then get ``Partial`` gradients, which DTensor reduces when the optimizer reads them;
* FSDP2: torch's ``fully_shard`` on every decoder layer and then on the whole model (:func:`fully_shard_backbone`),
  the layout NeMo speechlm2 and torchtitan use;
* context parallelism over packed rows: :mod:`audex.parallel.context_parallel`.

* expert parallelism (Nemotron-H): transformers' own EP plan (``base_model_ep_plan``) with ``ep_size == tp_size``:
  each rank of the TP group holds ``experts / EP`` experts, runs them on the group's shared batch, and the outputs
  are summed (``ep_implementation="all_reduce"``). Mamba and attention layers stay replicated (Nemotron-H's TP
  plan splits only the vocabulary).

Not here yet: EP across data-parallel ranks (all-to-all dispatch), SP plans for architectures other than Llama;
both are refused with a clear error rather than ignored.

Example (every rank of a 2-process group)::

    lm = load_tensor_parallel("backbone_folder", ParallelismConfig(world_size=2, tensor=2, sequence=True))
    fully_shard_backbone(lm, init_device_mesh("cpu", (2,)))      # or FSDP2 over 2 data-parallel ranks
"""

from __future__ import annotations

from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from transformers.distributed.tensor_parallel import (
    ALL_PARALLEL_STYLES,
    ColwiseParallel,
    RowwiseParallel,
    TensorParallelLayer,
    apply_tensor_parallelism,
)

from audex.parallel.config import ParallelismConfig


def _to_sequence_shard(x, mesh):
    """This rank's slice of a whole row along the sequence (backward all-gathers the gradient)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(placements=[Shard(1)]).to_local()


class _SequenceParallelEntry(TensorParallelLayer):
    """On the base model (``LlamaModel``): the row enters the decoder layers as sequence shards. Token ids are
    embedded whole first, so a caller that merges its own embeddings (``AudexModel.embed_inputs`` puts the audio
    frames in) passes the whole row as ``inputs_embeds`` just the same. The row's ``position_ids`` are required:
    the base model would otherwise number a shard's positions from 0."""

    def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
        if args:
            raise ValueError("a sequence-parallel base model takes keyword arguments (input_ids=/inputs_embeds=)")
        if kwargs.get("position_ids") is None:
            raise ValueError("sequence parallelism needs the whole row's position_ids in the model call")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs["input_ids"])
        return args, {**kwargs, "input_ids": None, "inputs_embeds": _to_sequence_shard(embeds, mesh)}


class _GatherSequenceInput(TensorParallelLayer):
    """On an attention or MLP block: all-gather its input from sequence shards to the whole row (the backward
    keeps this rank's slice of the gradient)."""

    def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
        key = "hidden_states" if "hidden_states" in kwargs else None
        x = kwargs[key] if key else args[0]
        x = DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(placements=[Replicate()]).to_local()
        if key:
            return args, {**kwargs, key: x}
        return (x,) + args[1:], kwargs


#: Megatron-style sequence parallelism for Llama-family layers, written with transformers' TP styles: hidden states
#: between blocks are sequence shards; each attention / MLP block gathers its input, its column-parallel projections
#: run on whole rows, and its row-parallel output projection reduce-scatters back to sequence shards.
SP_STYLES = {
    "audex_sp_entry": _SequenceParallelEntry(),
    "audex_sp_gather": _GatherSequenceInput(),
    "audex_rowwise_to_sequence": RowwiseParallel(input_layouts=Shard(-1), output_layouts=Shard(1)),
    "audex_colwise_from_sequence_gather": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
}
LLAMA_SP_PLAN = {
    "model": "audex_sp_entry",
    "model.layers.*.input_layernorm": "sequence_parallel",
    "model.layers.*.self_attn": "audex_sp_gather",
    "model.layers.*.self_attn.q_proj": "colwise",
    "model.layers.*.self_attn.k_proj": "colwise",
    "model.layers.*.self_attn.v_proj": "colwise",
    "model.layers.*.self_attn.o_proj": "audex_rowwise_to_sequence",
    "model.layers.*.post_attention_layernorm": "sequence_parallel",
    "model.layers.*.mlp": "audex_sp_gather",
    "model.layers.*.mlp.gate_proj": "colwise",
    "model.layers.*.mlp.up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "audex_rowwise_to_sequence",
    "model.norm": "sequence_parallel",
    "lm_head": "audex_colwise_from_sequence_gather",
}


def register_sequence_parallel_styles() -> None:
    for name, style in SP_STYLES.items():
        ALL_PARALLEL_STYLES.register(name, style)


SP_PLANS = {"llama": LLAMA_SP_PLAN}


def distributed_config(p: ParallelismConfig, model_type: str = "llama") -> DistributedConfig:
    """transformers' ``DistributedConfig`` for the tensor- (and sequence-) parallel part of ``p``: the model's own
    TP plan, or with ``sequence=true`` the written SP plan of its architecture (:data:`SP_PLANS`)."""
    if p.expert > 1:
        if p.expert != p.tensor or p.expert_tensor_size != 1:
            raise NotImplementedError(
                f"engine hf builds expert parallelism inside the tensor-parallel group (expert == tensor, "
                f"expert_tensor=1: transformers' all_reduce dispatch, experts not split by TP); got expert="
                f"{p.expert}, tensor={p.tensor}, expert_tensor={p.expert_tensor_size}. EP across data-parallel "
                "ranks (all-to-all) is not built yet")
        if p.sequence:
            raise NotImplementedError("parallelism.sequence=true with experts: no SP plan for MoE backbones yet")
        return DistributedConfig(tp_size=p.tensor, ep_size=p.expert, ep_implementation="all_reduce")
    if not p.sequence:
        return DistributedConfig(tp_size=p.tensor)
    if model_type not in SP_PLANS:
        raise NotImplementedError(f"parallelism.sequence=true has a written plan for {sorted(SP_PLANS)} backbones, "
                                  f"not {model_type!r}: set sequence=false (tensor parallelism without SP)")
    register_sequence_parallel_styles()
    return DistributedConfig(tp_size=p.tensor, tp_plan=SP_PLANS[model_type])


def load_tensor_parallel(folder: str, p: ParallelismConfig, dtype=None):
    """A causal LM from a local Hugging Face folder, its weights loaded as this rank's TP shards (DTensors).
    With sequence parallelism, call it with the row's ``position_ids`` and keyword arguments.

    ``use_kernels=False``: from transformers 5.25 on, ``from_pretrained`` "kernelizes" by default, which swaps the
    forward of every ``RMSNorm`` for a Hub-kernel dispatcher and so drops the ``sequence_parallel`` style's input
    hook (the norm then multiplies a DTensor weight by a local tensor). Audex loads offline and keeps the torch
    forwards the plans were written against."""
    model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, use_kernels=False,
                                                distributed_config=distributed_config(p, model_type))


def apply_tensor_plan(lm, tp_mesh, tp_plan: dict[str, str]) -> None:
    """transformers' ``apply_tensor_parallelism`` on a model whose weights already exist (every rank built or loaded
    them). Its plans also name a tied head's weight (``lm_head.weight`` beside ``model.embed_tokens.weight``),
    which ``named_parameters()`` lists once, under the embedding's name, so transformers takes the alias for a
    module name and stops with ``KeyError: 'lm_head.weight'`` (its own ``from_pretrained`` shards while loading,
    before tying). The alias is left out: the shared tensor gets the embedding's split (vocabulary rows, the rows
    the head's ``colwise`` split takes too), the head module keeps its forward hook, and the head is re-tied to
    the sharded embedding."""
    params, modules = dict(lm.named_parameters()), dict(lm.named_modules())

    def alias(name: str) -> bool:
        owner, _, attr = name.rpartition(".")
        return name not in params and owner in modules and getattr(modules[owner], attr, None) is not None and \
            attr in modules[owner]._parameters

    apply_tensor_parallelism(lm, tp_mesh, {k: v for k, v in tp_plan.items() if not alias(k)})
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is not None and getattr(lm.config.get_text_config(), "tie_word_embeddings", False):
        head.weight = embedding.weight


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
