"""Whole Megatron state dicts <-> this rank's tensor- and expert-parallel shards.

megatron-core marks every split parameter (``tensor_model_parallel``, ``partition_dim``); what it does not record
is that some rows are several tensors stacked, each split on its own (Megatron-Bridge's ``GatedMLPMapping`` and
Mamba mappings do the same):

* gated ``linear_fc1`` = ``[gate; up]``: each half is split by TP;
* Mamba ``in_proj`` = ``[z, x, B, C, dt]`` and ``conv1d`` = ``[x, B, C]``: each part is split by TP.

Routed experts are split by expert parallelism: rank r of the EP group holds experts ``r·E/EP .. (r+1)·E/EP - 1``
as ``local_experts.0..``; inside an expert, the expert-tensor-parallel group (``parallelism.expert_tensor``, by
default = ``tensor``) splits its weights as TP splits dense ones.

Example::

    split = load_whole_state_dict(model, whole, dims, ranks)       # every rank: takes its slices
    whole_again = gather_whole_state_dict(model, dims, split, ranks)   # every rank: all-gathers them back
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: a routed expert's tensor: local-spec ``experts.local_experts.{i}.linear_fc1.weight`` or TE's grouped
#: ``experts.linear_fc1.weight{i}`` (prefix, local index, suffix)
_EXPERT = re.compile(r"(.*\.experts\.local_experts\.)(\d+)(\..*)|(.*\.experts\.linear_fc[12]\.weight)(\d+)()$")


def _expert_parts(m) -> tuple[str, int, str]:
    g = m.groups()
    return (g[0], int(g[1]), g[2]) if g[0] is not None else (g[3], int(g[4]), g[5])


@dataclass(frozen=True)
class ShardDims:
    """Sizes of the stacked rows (from the backbone config); 0 when the model has no such layer."""

    gated_mlp: bool = False           # Llama's fc1 = [gate; up]
    mamba_inner: int = 0              # d_inner = mamba heads x head dim
    mamba_bc: int = 0                 # n_groups x state size (each of B and C)
    mamba_heads: int = 0
    num_experts: int = 0


@dataclass(frozen=True)
class Ranks:
    """This rank's place in the tensor- and expert-parallel groups (``group=None``: size 1)."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: object = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: object = None
    etp_rank: int = 0
    etp_size: int = 1
    etp_group: object = None

    @classmethod
    def from_parallel_state(cls) -> "Ranks":
        from megatron.core import parallel_state as ps

        return cls(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                   ps.get_tensor_model_parallel_group(), ps.get_expert_model_parallel_rank(),
                   ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_group(),
                   ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                   ps.get_expert_tensor_parallel_group())

    def tensor(self, expert: bool) -> tuple[int, int, object]:
        """(rank, size, group) of the group that splits a tensor: expert-TP for routed experts, TP otherwise."""
        return (self.etp_rank, self.etp_size, self.etp_group) if expert else (self.tp_rank, self.tp_size, self.tp_group)


def tp_parts(name: str, dims: ShardDims) -> list[int] | None:
    """Row sizes of the tensors stacked in ``name`` (each split by TP on its own), or None for a plain split."""
    if name.endswith("mlp.linear_fc1.weight") and dims.gated_mlp and "experts" not in name:
        return [-1, -1]
    if dims.mamba_inner and name.endswith("mixer.in_proj.weight"):
        return [dims.mamba_inner, dims.mamba_inner, dims.mamba_bc, dims.mamba_bc, dims.mamba_heads]
    if dims.mamba_inner and (name.endswith("mixer.conv1d.weight") or name.endswith("mixer.conv1d.bias")):
        return [dims.mamba_inner, dims.mamba_bc, dims.mamba_bc]
    return None


def _split(whole: torch.Tensor, parts: list[int] | None, dim: int, size: int) -> list[torch.Tensor]:
    """``whole`` cut into ``size`` TP shards along ``dim``, stacked parts split each on its own."""
    if parts is None:
        return list(torch.chunk(whole, size, dim=dim))
    if parts == [-1, -1]:
        parts = [whole.shape[dim] // 2] * 2
    pieces = [torch.chunk(p, size, dim=dim) for p in torch.split(whole, parts, dim=dim)]
    return [torch.cat([p[r] for p in pieces], dim=dim) for r in range(size)]


def _join(shards: list[torch.Tensor], parts: list[int] | None, dim: int) -> torch.Tensor:
    """Inverse of :func:`_split`."""
    if parts is None:
        return torch.cat(shards, dim=dim)
    size = len(shards)
    if parts == [-1, -1]:
        parts = [shards[0].shape[dim] * size // 2] * 2
    local = [p // size for p in parts]
    per_rank = [torch.split(s, local, dim=dim) for s in shards]
    return torch.cat([torch.cat([per_rank[r][i] for r in range(size)], dim=dim) for i in range(len(parts))], dim=dim)


def _global_name(name: str, ranks: Ranks, local_experts: int) -> str:
    m = _EXPERT.match(name)
    if m is None:
        return name
    head, index, tail = _expert_parts(m)
    return f"{head}{ranks.ep_rank * local_experts + index}{tail}"


def _local_experts(model) -> int:
    seen = {_expert_parts(m)[1] for m in (_EXPERT.match(n) for n, _ in model.named_parameters()) if m}
    return len(seen)


def _split_dim(local: torch.Tensor, whole: torch.Tensor, tp_size: int) -> int | None:
    """The dimension TP split (the one where the whole tensor is ``tp_size`` times the local one); None when
    replicated. megatron-core marks split parameters (``partition_dim``) only when it initialises them."""
    if local.shape == whole.shape:
        return None
    differ = [d for d in range(whole.dim()) if whole.shape[d] != local.shape[d]]
    if local.dim() != whole.dim() or len(differ) != 1 or whole.shape[differ[0]] != local.shape[differ[0]] * tp_size:
        raise ValueError(f"a tensor of shape {tuple(whole.shape)} cannot be this rank's TP-{tp_size} shard of "
                         f"shape {tuple(local.shape)}")
    return differ[0]


def local_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and the persistent buffers that are weights (the router's ``expert_bias``), by local name."""
    out = dict(model.named_parameters())
    out.update({n: b for n, b in model.named_buffers() if n.endswith("router.expert_bias")})
    return out


@torch.no_grad()
def load_whole_state_dict(model, whole: dict, dims: ShardDims, ranks: Ranks | None = None) -> dict[str, int]:
    """Copy this rank's slices of the whole Megatron state dict into ``model`` (every tensor must be present).
    Returns the TP split dimension of every split tensor (for :func:`gather_whole_state_dict`)."""
    ranks = ranks or Ranks()
    n_local = _local_experts(model)
    missing, split = [], {}
    for name, tensor in local_tensors(model).items():
        key = _global_name(name, ranks, n_local)
        if key not in whole:
            missing.append(key)
            continue
        value = whole[key]
        rank, size, _ = ranks.tensor(bool(_EXPERT.match(name)))
        dim = None if size == 1 else _split_dim(tensor, value, size)
        if dim is not None:
            split[name] = dim
            value = _split(value, tp_parts(name, dims), dim, size)[rank]
        if value.shape != tensor.shape:
            raise ValueError(f"{key}: the checkpoint gives shape {tuple(value.shape)} for this rank, the model has "
                             f"{tuple(tensor.shape)} (TP {ranks.tp_size}, EP {ranks.ep_size})")
        tensor.copy_(value)
    if missing:
        raise KeyError(f"the converted state dict lacks {len(missing)} Megatron tensors, e.g. {missing[:3]}")
    return split


def _all_gather(tensor: torch.Tensor, size: int, group) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


@torch.no_grad()
def gather_whole_state_dict(model, dims: ShardDims, split: dict[str, int],
                            ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
    """The whole Megatron state dict from every rank's shards (a collective: all ranks of the TP and EP groups
    call it; every rank gets the whole dict). ``split``: what :func:`load_whole_state_dict` returned."""
    ranks = ranks or Ranks()
    n_local = _local_experts(model)
    out = {}
    for name, tensor in local_tensors(model).items():
        value, expert = tensor.detach(), bool(_EXPERT.match(name))
        _, size, group = ranks.tensor(expert)
        if name in split and size > 1:
            value = _join(_all_gather(value, size, group), tp_parts(name, dims), split[name])
        if expert and ranks.ep_size > 1:
            for r, shard in enumerate(_all_gather(value, ranks.ep_size, ranks.ep_group)):
                out[_global_name(name, Ranks(ep_rank=r), n_local)] = shard.clone()
            continue
        out[_global_name(name, ranks, n_local) if expert else name] = value.clone()
    return out
