"""What ``AudexModel`` does on the mesh of :class:`~audex.parallel.strategy.AudexParallelStrategy` (engine ``hf``).

* :func:`parallelize_model` (``configure_model``): the backbone gets transformers' own TP plan (or the written
  Llama SP plan, or the Nemotron-H EP plan: :func:`audex.parallel.hf_engine.distributed_config`) applied to
  the weights every rank built or loaded identically, then FSDP2 over the ``fsdp`` group (data x context
  ranks; HSDP when ``parallelism.fsdp`` < data): each decoder layer, the embedding + head, the backbone root.
  The adapter is replicated (:func:`average_replicated_gradients`), the frozen audio encoder and codecs too.
* stage-1 text-row gradient masks move from tensor hooks (which FSDP2's sharded parameters never run) to
  :func:`mask_row_gradients`, run before clipping and the optimizer step, each rank masking its own rows of
  the vocabulary (a TP vocab shard, an FSDP row shard, or all of them);
* :func:`clip_grad_norm_global`: one norm over every shard of every gradient, as one process computes it;
* :func:`cp_loss`: eq. (2) over the context-parallel split of the packed rows
  (:mod:`audex.parallel.context_parallel`); since the ``fsdp`` group averages gradients over data x context
  ranks, each rank's share is scaled by CP, which makes the average the CP **sum** within a row;
* :func:`gather_full_state`: the whole model's state on rank 0 (for the ``.nemo`` of a stage's end);
* :func:`rank0_state` / :func:`materialize_from_rank0` (``parallelism.meta_init``): every rank but 0 built the
  backbone on the meta device (:func:`audex.modules.backbone.backbone_on_meta`); after sharding, each rank's
  shards are filled from rank 0's weights, one tensor at a time (torch's ``set_model_state_dict`` with
  ``broadcast_from_rank0``, the loading FSDP2 documents for meta-device init). Rank 0 alone holds the whole
  model, in host memory, until then; the other ranks never allocate more than their shards. When the backbone
  comes from ``model.backbone.pretrained_path`` (safetensors), rank 0 builds it on meta too and every rank reads
  its own shards from the files (:mod:`audex.parallel.sharded_read`); only the audio encoder, adapter and codecs
  are broadcast.

Example (what the Lightning hooks call)::

    parallelize_model(model, mesh, parallelism, rank0_state(model), device)    # configure_model (meta_init)
    mask_row_gradients(model); clip_grad_norm_global(model.parameters(), 1.0)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from transformers.distributed.expert_parallel import apply_expert_parallelism

from audex.data.collate import batch_field
from audex.parallel.config import ParallelismConfig
from audex.parallel.context_parallel import (
    context_parallel,
    cp_inputs_embeds,
    cp_square_averaged_loss,
    shard_packed_batch,
)
from audex.parallel.hf_engine import apply_tensor_plan, decoder_layers, distributed_config
from audex.parallel.sharded_read import read_backbone_shards
from audex.parts.losses import IGNORE_INDEX

HOOKS_ATTR = "_audex_grad_mask_handles"   # where audex.training.stages keeps the row-mask hooks


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _take_row_masks(model) -> dict[str, torch.Tensor]:
    """Remove the stage's row-mask hooks; return ``{parameter name: bool [rows]}``."""
    for handle in getattr(model, HOOKS_ATTR, []):
        handle.remove()
    setattr(model, HOOKS_ATTR, [])
    masks = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if getattr(p, "audex_row_mask", None) is not None:
            masks[name] = p.audex_row_mask
            del p.audex_row_mask
    return masks


def attach_row_masks(model) -> None:
    """Each (sharded) row-masked parameter gets its rows of the mask as ``audex_row_mask``, laid out like the
    parameter. Called again before the optimizer is built and before each step: moving a module (Lightning's
    ``model.to(device)``) swaps DTensor parameters in place and drops their Python attributes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in getattr(model, "_audex_row_masks", {}).items():
        p = params[name]
        if isinstance(p, DTensor):
            if any(not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)) for pl in p.placements):
                raise NotImplementedError(f"{name} is sharded as {p.placements}: a row mask needs rows kept whole "
                                          "(Shard(0) or Replicate)")
            mask = distribute_tensor(mask.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        p.audex_row_mask = mask


def parallelize_model(model, mesh, p: ParallelismConfig, rank0: dict | None = None,
                      device: torch.device | None = None) -> None:
    """Shard ``model`` on ``mesh`` per ``p``: an AudexModel whose weights are equal on every rank, or, given
    ``rank0`` (:func:`rank0_state`), one whose backbone is on the meta device on ranks > 0: the shards are then
    filled from rank 0 on ``device`` (:func:`materialize_from_rank0`) before FSDP2 initialises."""
    lm = model.backbone
    masks = _take_row_masks(model)
    if p.tensor > 1:
        config = distributed_config(p, lm.config.model_type)
        tp_plan, ep_plan, _ = lm._resolve_parallel_plans(config)
        tp_mesh = mesh["tensor_parallel"]
        apply_tensor_plan(lm, tp_mesh, tp_plan)
        if ep_plan:     # experts split inside the TP group (hf_engine: expert == tensor)
            apply_expert_parallelism(lm, tp_mesh, tp_mesh, ep_plan, ep_implementation=config.ep_implementation)
    replicas, shards = mesh["dp_replicate"].size(), mesh["fsdp"].size()
    if replicas * shards > 1:
        dp_mesh = mesh["fsdp"] if replicas == 1 else mesh["dp_replicate", "fsdp"]
        for layer in decoder_layers(lm):
            fully_shard(layer, mesh=dp_mesh)
        # one unit for the embeddings and the head (one tensor when tied): AudexModel.embed_inputs calls the
        # embedding outside the backbone's forward, so the root unit would not gather it
        tables = [m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None]
        fully_shard(tables, mesh=dp_mesh)
        fully_shard(lm, mesh=dp_mesh)
    if rank0 is not None:
        materialize_from_rank0(model, rank0, device or torch.device("cpu"))
    if replicas * shards > 1:
        # FSDP2 takes the first unit to run forward as the root; the embedding unit runs before the backbone,
        # so the backbone is made the root of its units now (torch's own lazy init, called early; after the
        # shards hold real weights, since it checks that none is left on the meta device)
        lm._get_fsdp_state()._lazy_init()
    model._audex_row_masks = masks
    attach_row_masks(model)
    if getattr(model, "moe_balancer", None) is not None:
        model.moe_balancer.group = mesh["data_context"].get_group()


@torch.no_grad()
def average_replicated_gradients(model, mesh) -> None:
    """The adapter stays replicated (a few million weights): its gradients are averaged over the data x context
    ranks here, as FSDP2 averages the backbone's. Not FSDP2, because a rank whose micro-batch has no audio
    does not run the adapter, and FSDP2's gathers must run on every rank; this all-reduce always runs.

    When no rank ran the adapter (a global batch without audio), its gradients stay unset on every rank, as in
    one process: AdamW then skips it. Zero gradients instead would advance its step count, decay its moments
    and apply weight decay, so that a data-parallel run's adapter drifted from one process's (1.5 % smaller
    updates after 3 steps of the 4-process test, tests/parallel/test_lightning_4proc.py)."""
    group = mesh["data_context"]
    if group.size() == 1 or model.adapter is None:
        return
    params = [p for p in model.adapter.parameters() if p.requires_grad]
    ran = torch.tensor([float(any(p.grad is not None for p in params))],
                       device=next(model.adapter.parameters()).device)     # NCCL: on the GPU
    dist.all_reduce(ran, group=group.get_group())
    if not params or float(ran) == 0.0:
        return
    for p in params:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=group.get_group())
        p.grad = grad.div_(group.size())


@torch.no_grad()
def mask_row_gradients(model) -> None:
    """Zero the gradients of the frozen (text) rows of row-masked tables, on whatever shard each rank holds."""
    attach_row_masks(model)
    for p in model.parameters():
        mask = getattr(p, "audex_row_mask", None)
        if mask is not None and p.grad is not None:
            local = _local(mask)
            _local(p.grad).mul_(local.to(p.grad.dtype).unsqueeze(1))


@torch.no_grad()
def clip_grad_norm_global(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; returns the norm before.
    Hand-written because ``torch.nn.utils.clip_grad_norm_`` stacks per-tensor norms, which fails for a mix of
    DTensors on different meshes and plain tensors (TP backbone beside a replicated encoder)."""
    grads, seen = [], set()
    for p in parameters:
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            grads.append(p.grad)
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:          # same order on every rank: the collectives of full_tensor() pair up
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        squares += n.double().cpu() ** 2
    total = squares.sqrt()
    coef = min(float(max_norm) / (float(total) + 1e-6), 1.0)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _non_persistent_buffers(model) -> list[str]:
    """Buffers outside the state dict (rotary ``inv_freq``, ...), by name, in module order (equal on every rank)."""
    return [f"{name}.{b}" if name else b for name, module in model.named_modules()
            for b in sorted(module._non_persistent_buffers_set) if getattr(module, b, None) is not None]


def rank0_state(model) -> dict[str, torch.Tensor]:
    """Rank 0: the whole model's state dict plus its non-persistent buffers, taken before sharding (references,
    no copies); every other rank: ``{}``. The source of :func:`materialize_from_rank0`."""
    if dist.get_rank() != 0:
        return {}
    state = dict(model.state_dict())
    state.update({name: model.get_buffer(name) for name in _non_persistent_buffers(model)})
    return state


@torch.no_grad()
def materialize_from_rank0(model, rank0: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill every rank's (sharded) model with rank 0's weights; collective. Ranks whose backbone is on the meta
    device allocate their shards on ``device`` first (``to_empty``, as FSDP2's meta-device recipe does), rank 0
    moves its shards there; then the persistent state goes through ``set_model_state_dict(full_state_dict=True,
    broadcast_from_rank0=True)`` (torch cuts each whole tensor to the receiving rank's shard) and the
    non-persistent buffers are broadcast whole. A tensor left on the meta device afterwards is an error.

    A backbone with a ``sharded_source`` (built on meta on every rank, rank 0 included) is not broadcast: each rank
    reads its own shards from the safetensors files (:func:`audex.parallel.sharded_read.read_backbone_shards`);
    the rest of the model (audio encoder, adapter, codecs) still comes from rank 0. What happened is kept as
    ``model.llm.read_report`` (``source``: ``safetensors`` or ``rank0``; ``on_meta_before_read``)."""
    backbone = getattr(model, "llm", None)
    shards = getattr(backbone, "sharded_source", None) is not None
    agree = torch.tensor([int(shards)], device=device)
    dist.all_reduce(agree)
    if int(agree) not in (0, dist.get_world_size()):
        raise RuntimeError("ranks disagree on reading the backbone's shards from its folder (different files?)")
    was_meta = backbone is not None and all(t.is_meta for t in (*backbone.parameters(), *backbone.buffers()))
    if dist.get_rank() == 0:
        if shards:
            backbone.to_empty(device=device)
        model.to(device)
    else:
        model.to_empty(device=device)
    prefix = next((f"{n}." for n, m in model.named_modules() if m is backbone), None) if shards else None
    if shards:
        read_backbone_shards(backbone)
    elif backbone is not None:
        backbone.read_report = {"source": "rank0"}
    if backbone is not None:
        backbone.read_report["on_meta_before_read"] = was_meta
    names = {k for k in model.state_dict() if prefix is None or not k.startswith(prefix)}
    set_model_state_dict(model, {k: v for k, v in rank0.items() if k in names},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not shards))
    for name in _non_persistent_buffers(model):
        if prefix is not None and name.startswith(prefix):
            continue                     # recomputed by read_backbone_shards
        module_name, _, buffer = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        value = rank0[name].to(device) if dist.get_rank() == 0 else torch.empty_like(getattr(module, buffer),
                                                                                      device=device)
        dist.broadcast(value, src=0)
        module.register_buffer(buffer, value, persistent=False)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} tensors are still on the meta device after loading rank 0's weights "
                           f"(e.g. {left[:3]}): set parallelism.meta_init=false and report the model type")


def gather_full_state(model) -> dict[str, torch.Tensor]:
    """The model's whole state dict (DTensor shards gathered) on rank 0, ``{}`` on the others. Collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def cp_loss(model, batch: dict, mesh, p: ParallelismConfig) -> tuple[torch.Tensor, dict]:
    """Eq. (2) of a packed micro-batch split over the context-parallel ranks. Returns ``(share x CP, stats)``:
    backpropagate the first; ``stats['loss']`` is the whole micro-batch's eq. (2) value (equal on every rank)."""
    if model.loss_reduction != "square_averaged" or model.loss_unit != "sample":
        raise ValueError("parallelism.context > 1 computes eq. (2) per sample: set model.loss.reduction="
                         "square_averaged and model.loss.square_average_unit=sample (or parallelism.context=1)")
    cp_mesh = mesh["context_parallel"]
    shard = shard_packed_batch(*(batch_field(batch, k) for k in ("input_ids", "labels", "position_ids", "sample_ids")),
                               cp_size=p.context, cp_rank=cp_mesh.get_local_rank(), pad_id=model.tokenizer.pad_id,
                               group=cp_mesh.get_group(), pad_multiple=p.sample_pad_multiple)
    audios = batch_field(batch, "audios")
    audio_embeds = model.encode_audio(audios) if audios else None
    with context_parallel(model.backbone):
        embeds = cp_inputs_embeds(model.embed_inputs, shard, audio_embeds)
        logits = model.backbone(inputs_embeds=embeds, position_ids=shard.position_ids, use_cache=False,
                                audex_cp=shard).logits
    share, loss = cp_square_averaged_loss(logits, shard)
    trainable = shard.targets != IGNORE_INDEX
    correct = (logits.detach().argmax(-1) == shard.targets) & trainable
    safe = torch.where(trainable, shard.targets, torch.zeros_like(shard.targets))
    token_sum = (F.cross_entropy(logits.detach().float().flatten(0, 1), safe.flatten(), reduction="none")
                 * trainable.flatten()).sum()
    sums = torch.stack([trainable.sum(), correct.sum(), (shard.sample_ids >= 0).sum(), token_sum]).float()
    dist.all_reduce(sums, group=cp_mesh.get_group())
    n = sums[0].clamp(min=1)
    stats = {"loss": loss, "trainable_tokens": sums[0], "token_accuracy": sums[1] / n, "real_tokens": sums[2],
             "token_mean_loss": sums[3] / n}
    return share * p.context, stats
