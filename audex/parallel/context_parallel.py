"""Context parallelism over packed rows (the paper's CP8 over 262,144 tokens), exact, on any device.

A packed row is split across the CP ranks the way Transformer Engine's THD context parallelism splits it:
every sample is padded to a multiple of ``2·CP`` (``2·CP·TP`` with sequence parallelism), cut into ``2·CP``
equal chunks, and rank ``r`` keeps chunks ``r`` and ``2·CP-1-r`` of every sample (mirrored halves: the cheap
early chunk of causal attention pairs with the expensive late one, so every rank does equal work). Labels are
shifted *before* the split (a rank's last token predicts a token another rank holds).

* attention stays per sample and exact: each rank gathers the K and V of the whole row in **one**
  collective (K and V stacked into one tensor; two autograd all-gathers could run their backward collectives
  in different orders on different ranks), then runs causal SDPA of each local chunk against its sample's
  prefix. Registered with transformers as ``audex_cp_sdpa`` (GQA native).
* Mamba layers stay exact: each rank gathers the layer input of the row and runs the mixer over the prefix of
  every sample span it holds tokens of (the recurrence needs the whole prefix), keeping its own positions.
  Mamba costs CP times its single-rank compute this way; exactness, not speed, is this path's point.
* the square-averaged loss of eq. (2) all-reduces the per-sample token counts; each rank's share sums to the
  one-process loss, so parameter gradients are the **sum** over the CP group.

Why hand-written: torch's ``context_parallel`` (``torch.distributed.tensor.experimental``, a prototype) runs
ring attention for whole-sequence causal SDPA only, and its handlers cover the CUDA flash / efficient / cuDNN
ops only (not ``_scaled_dot_product_flash_attention_for_cpu``, the op SDPA runs on a CPU); packed
samples need its FlexAttention path with ``_PerDocumentHeadTailLoadBalancer``, and FlexAttention has no CPU
backward in torch 2.13. Transformer Engine's THD CP and megatron-core's CP need CUDA. This module covers the CPU
(gloo) path and is the reference those GPU engines are tested against.

Example (each of the CP ranks, same batch on all)::

    shard = shard_packed_batch(batch.input_ids, batch.labels, batch.position_ids, batch.sample_ids,
                               cp_size=2, cp_rank=rank, pad_id=tok.pad_id, group=cp_group)
    with context_parallel(model.backbone):
        embeds = cp_inputs_embeds(model.embed_inputs, shard, audio_embeds)      # audio frames placed row-wide
        logits = model.backbone(inputs_embeds=embeds, position_ids=shard.position_ids, use_cache=False,
                                audex_cp=shard).logits
    loss_share, loss = cp_square_averaged_loss(logits, shard)
    loss_share.backward()        # then all-reduce (sum) the parameter gradients over the CP group
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from audex.modules.packed import packed_segments
from audex.parts.losses import IGNORE_INDEX

CP_SDPA = "audex_cp_sdpa"


@dataclass
class CPLayout:
    """The padded, load-balanced layout of a packed batch (identical on every CP rank).

    ``source[b, p]``: original position of padded position ``p`` (-1: padding); ``spans[b]``: padded
    ``(start, end)`` of each sample (its padding included, trailing row padding excluded); ``local_index[r]``:
    ``[B, length / cp]`` padded positions rank ``r`` holds, in its local order; ``restore[b]``: for each padded
    position, its place in the rank-major concatenation of the ranks' local rows."""

    cp_size: int
    length: int
    source: torch.Tensor
    spans: list[list[tuple[int, int]]]
    local_index: torch.Tensor
    restore: torch.Tensor


def _mirrored_chunks(start: int, end: int, cp_size: int, rank: int) -> list[tuple[int, int]]:
    c = (end - start) // (2 * cp_size)
    return [(start + rank * c, start + (rank + 1) * c), (end - (rank + 1) * c, end - rank * c)]


def plan_context_parallel(sample_ids: torch.Tensor, cp_size: int, pad_multiple: int | None = None,
                          length: int | None = None) -> CPLayout:
    """Pad every sample of ``sample_ids [B, L]`` (-1 = padding) to ``pad_multiple`` (default ``2·cp_size``) and
    assign mirrored chunks to the ranks. ``length`` fixes the padded row length (static shapes); default: the
    longest padded row."""
    multiple = pad_multiple or 2 * cp_size
    if cp_size < 1 or multiple % (2 * cp_size):
        raise ValueError(f"pad_multiple {multiple} must be a multiple of 2 x cp_size = {2 * cp_size}")
    segments = packed_segments(sample_ids)
    padded = [[-(-(e - s) // multiple) * multiple for s, e in row] for row in segments]
    need = max((sum(row) for row in padded), default=0)
    need = max(-(-need // multiple) * multiple, multiple)
    if length is None:
        length = need
    elif length < need or length % multiple:
        raise ValueError(f"a packed row needs {need} tokens once each sample is padded to a multiple of {multiple}; "
                         f"length={length} is {'smaller' if length < need else 'not a multiple of it'}: pack rows "
                         "shorter (leave room for the per-sample padding) or raise the length")
    B = sample_ids.shape[0]
    source = torch.full((B, length), -1, dtype=torch.long)
    spans, local = [], [[] for _ in range(cp_size)]
    for b, (row, sizes) in enumerate(zip(segments, padded)):
        at, row_spans = 0, []
        for (s, e), n in zip(row, sizes):
            source[b, at:at + e - s] = torch.arange(s, e)
            row_spans.append((at, at + n))
            at += n
        spans.append(row_spans)
        tail = [(at, length)] if at < length else []
        for r in range(cp_size):
            idx = [torch.arange(a, z) for s, e in row_spans + tail for a, z in _mirrored_chunks(s, e, cp_size, r)]
            local[r].append(torch.cat(idx))
    local_index = torch.stack([torch.stack(rows) for rows in local])          # [cp, B, length / cp]
    restore = torch.argsort(torch.cat(list(local_index), dim=1), dim=1)
    return CPLayout(cp_size, length, source, spans, local_index, restore)


def shift_labels(labels: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
    """Targets ``[B, L]``: position t predicts ``labels[t+1]`` when t+1 is a trainable token of the same sample,
    else ``-100`` (the rule of :func:`audex.parts.losses.token_cross_entropy`, applied before the CP split)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    nxt, nxt_sid = labels[:, 1:], sample_ids[:, 1:]
    keep = (nxt != IGNORE_INDEX) & (nxt_sid >= 0) & (sample_ids[:, :-1] == nxt_sid)
    targets[:, :-1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE_INDEX))
    return targets


@dataclass
class CPShard:
    """One CP rank's share of a packed batch: model inputs for its positions, and the layout to gather with.

    ``sample_ids`` is -1 on every padding token (for the loss and MoE statistics); ``chunks[b]`` lists the
    rank's ``(local_start, padded_start, size, span_start)`` pieces of real sample spans; ``padded_input_ids`` is
    the whole padded row (every rank), for embeddings that need the row (:func:`cp_inputs_embeds`)."""

    layout: CPLayout
    rank: int
    group: object
    padded_input_ids: torch.Tensor
    input_ids: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    sample_ids: torch.Tensor
    chunks: list[list[tuple[int, int, int, int]]]
    num_samples: int

    @property
    def index(self) -> torch.Tensor:
        """``[B, L_local]`` padded positions this rank holds."""
        return self.layout.local_index[self.rank]


def _to_padded(x: torch.Tensor, source: torch.Tensor, fill: int) -> torch.Tensor:
    picked = torch.gather(x, 1, source.clamp(min=0))
    return torch.where(source >= 0, picked, torch.full_like(picked, fill))


def shard_packed_batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                       sample_ids: torch.Tensor, cp_size: int, cp_rank: int, pad_id: int, group=None,
                       pad_multiple: int | None = None, length: int | None = None) -> CPShard:
    """Shift labels, pad every sample, and keep rank ``cp_rank``'s mirrored chunks (see :func:`plan_context_parallel`)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside the CP group of {cp_size}")
    layout = plan_context_parallel(sample_ids, cp_size, pad_multiple, length)
    src = layout.source
    targets = _to_padded(shift_labels(labels, sample_ids), src, IGNORE_INDEX)
    ids = _to_padded(input_ids, src, pad_id)
    sids = _to_padded(sample_ids, src, -1)
    pos = _to_padded(position_ids, src, -1)
    for b, row in enumerate(layout.spans):           # padding continues its sample's positions
        for s, e in row:
            real = int((src[b, s:e] >= 0).sum())
            pos[b, s + real:e] = pos[b, s + real - 1] + torch.arange(1, e - s - real + 1)
        pos[b][pos[b] < 0] = 0
    index = layout.local_index[cp_rank]
    chunks = []
    for b, row in enumerate(layout.spans):
        row_chunks, local_at = [], 0
        for s, e in row:
            for a, z in _mirrored_chunks(s, e, cp_size, cp_rank):
                row_chunks.append((local_at, a, z - a, s))
                local_at += z - a
        chunks.append(row_chunks)
    pick = lambda x: torch.gather(x, 1, index)  # noqa: E731
    num_samples = int(sample_ids.max().clamp(min=-1)) + 1
    return CPShard(layout, cp_rank, group, ids, pick(ids), pick(targets), pick(pos), pick(sids), chunks, num_samples)


def select_local(x: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """``[B, length, ...]`` in padded order (identical on every rank) -> this rank's ``[B, L_local, ...]``."""
    return x[torch.arange(x.shape[0]).unsqueeze(1), shard.index]


def cp_inputs_embeds(embed, shard: CPShard, audio_embeds=None) -> torch.Tensor:
    """This rank's ``inputs_embeds``: ``embed(ids, audio_embeds)`` (``AudexModel.embed_inputs``) over the whole
    padded row, so that every clip's frames land on their ``<so_embedding>`` positions whichever rank holds them,
    then this rank's positions. Gradients reach the adapter and the embeddings only through local positions;
    the CP gradient sum completes them."""
    return select_local(embed(shard.padded_input_ids, audio_embeds), shard)


class _AllGather(torch.autograd.Function):
    """``x`` of every rank of ``group``, stacked ``[group size, ...]``; the backward sums each rank's slice of the
    gradient over the group (reduce-scatter on NCCL/XCCL; elsewhere an all-reduce of the whole gradient, of which
    each rank keeps its slice). Not ``torch.distributed.nn.functional.all_gather``: its gloo backward passes
    *group* ranks to ``dist.scatter`` as *global* source ranks (torch 2.13), which raises "Global rank 1 is not
    part of group" for any CP group that is not the whole world (CP beside TP or data parallelism)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) in (dist.Backend.NCCL, getattr(dist.Backend, "XCCL", "xccl")):
            mine = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def gather_sequence(x: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """``[B, L_local, ...]`` on every rank -> ``[B, length, ...]`` in padded order, with one autograd all-gather
    (its backward sums each rank's gradient slices: :class:`_AllGather`)."""
    parts = _AllGather.apply(x, shard.group)
    rows = torch.cat(parts.unbind(0), dim=1)
    B = x.shape[0]
    return rows[torch.arange(B).unsqueeze(1), shard.layout.restore]


def cp_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers attention interface (``query [B, H, L_local, D]``, ``key``/``value [B, H_kv, L_local, D]``
    -> ``[B, L_local, H, D]``): exact per-sample causal attention over the whole row, K and V gathered in one
    collective. Needs ``audex_cp=`` (a :class:`CPShard`) in the model call."""
    shard: CPShard | None = kwargs.pop("audex_cp", None)
    if shard is None:
        raise ValueError(f"attention {CP_SDPA!r} needs audex_cp=<CPShard> in the model call (shard_packed_batch)")
    B, H, L, D = query.shape
    kv = torch.stack([key, value], dim=0).permute(1, 3, 0, 2, 4)              # [B, L, 2, H_kv, D]
    k_all, v_all = gather_sequence(kv, shard).permute(2, 0, 3, 1, 4)          # 2 x [B, H_kv, length, D]
    drop = dropout if module.training else 0.0
    out = query.new_zeros(B, H, L, D)                                         # padding rows stay zero
    for b, row in enumerate(shard.chunks):
        for local, start, size, span in row:
            q_pos = torch.arange(start, start + size).unsqueeze(1)
            k_pos = torch.arange(span, start + size).unsqueeze(0)
            out[b, :, local:local + size] = F.scaled_dot_product_attention(
                query[b:b + 1, :, local:local + size], k_all[b:b + 1, :, span:start + size],
                v_all[b:b + 1, :, span:start + size], attn_mask=(k_pos <= q_pos).to(query.device),
                dropout_p=drop, scale=scaling, enable_gqa=key.shape[1] != H)[0]
    return out.transpose(1, 2).contiguous(), None


def cp_mamba_forward(mixer_forward, hidden_states: torch.Tensor, shard: CPShard, **kwargs) -> torch.Tensor:
    """Run a Mamba mixer exactly under CP: gather the row's layer input (one collective), run the mixer over the
    prefix of each sample span up to this rank's last chunk of it, keep this rank's positions."""
    full = gather_sequence(hidden_states, shard)
    out = hidden_states.new_zeros(hidden_states.shape)
    for b, row in enumerate(shard.chunks):
        for i in range(0, len(row), 2):                                       # the two chunks of one span
            (l0, s0, n0, span), (l1, s1, n1, _) = row[i], row[i + 1]
            y = mixer_forward(full[b:b + 1, span:s1 + n1], **kwargs)[0]
            out[b, l0:l0 + n0] = y[s0 - span:s0 - span + n0]
            out[b, l1:l1 + n1] = y[s1 - span:s1 - span + n1]
    return out


def register_cp_attention() -> None:
    """Register ``audex_cp_sdpa`` with transformers (idempotent); its masks are the ``sdpa`` ones (unused)."""
    AttentionInterface.register(CP_SDPA, cp_sdpa_attention)
    if CP_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(CP_SDPA, sdpa_mask)


@contextmanager
def context_parallel(lm):
    """Within the block, ``lm`` (a transformers causal LM) runs context-parallel when called with
    ``audex_cp=<CPShard>`` and ``use_cache=False``: attention on ``audex_cp_sdpa``, Mamba mixers through :func:`cp_mamba_forward`.
    The attention implementation and the mixers are restored on exit."""
    register_cp_attention()
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(CP_SDPA)
    wrapped = []
    for module in lm.modules():
        if type(module).__name__.endswith("Mamba2Mixer"):
            original = module.forward

            def forward(hidden_states, cache=None, attention_mask=None, _orig=original, **kw):
                shard = kw.pop("audex_cp", None)
                if shard is None:
                    return _orig(hidden_states, cache=cache, attention_mask=attention_mask, **kw)
                if cache is not None:
                    raise ValueError("context-parallel rows run without a cache: call the model with use_cache=False")
                return cp_mamba_forward(_orig, hidden_states, shard, **kw)

            module.forward = forward
            wrapped.append((module, original))
    try:
        yield lm
    finally:
        for module, original in wrapped:
            module.forward = original
        lm.set_attn_implementation(previous)


def cp_square_averaged_loss(logits: torch.Tensor, shard: CPShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (2) under CP. Returns ``(share, loss)``: ``share`` is this rank's part (backpropagate it, then sum the
    parameter gradients over the CP group); ``loss`` is the detached eq. (2) value of the whole row, equal on
    every rank. Per-sample trainable-token counts are all-reduced before the square roots are taken."""
    targets = shard.targets
    trainable = targets != IGNORE_INDEX
    safe = torch.where(trainable, targets, torch.zeros_like(targets))
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe.reshape(-1),
                             reduction="none").view_as(targets) * trainable
    B, width = targets.shape[0], max(shard.num_samples, 1)
    key = (torch.arange(B).unsqueeze(1) * width + shard.sample_ids.clamp(min=0))[trainable]
    sums = losses.new_zeros(B * width).index_add(0, key, losses[trainable])
    counts = losses.new_zeros(B * width).index_add(0, key, torch.ones_like(key, dtype=losses.dtype))
    dist.all_reduce(counts, group=shard.group)
    present = counts > 0
    if not bool(present.any()):
        share = losses.sum() * 0.0
        return share, share.detach()
    root = counts[present].sqrt()
    share = (sums[present] / root).sum() / root.sum()
    total = share.detach().clone()
    dist.all_reduce(total, group=shard.group)
    return share, total
