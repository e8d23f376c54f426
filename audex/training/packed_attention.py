"""Attention over packed rows that costs sum_j n_j^2, not L^2: each sample of a row attends only to itself.

A packed row of length L holding samples of lengths n_1..n_k needs only the k diagonal blocks of the causal
attention matrix. A dense ``[L, L]`` mask (what ``AudexModel.forward`` builds from ``sample_ids``) still makes
SDPA compute all L^2 scores and then discard most of them, which on the tiny model makes a packed row of 1,024
tokens slower per real token than padded batches (``bench/train_throughput.py``). Megatron/Transformer Engine
avoid this with the THD layout (``cu_seqlens``) and flash-attention's varlen kernels; this module is the same
idea for any device: a transformers attention function, registered as ``audex_varlen_sdpa``, that runs causal
SDPA on every sample's span (``is_causal=True``, GQA native) and leaves padding positions at zero.

Without segment information (generation, evaluation of unpacked batches) it is exactly transformers' own
``sdpa`` attention with the usual masks, so a backbone switched to it stays a normal model.

Example::

    enable_varlen_attention(model)                      # once, for attention backbones (Llama family)
    segments = packed_segments(batch.sample_ids)        # per row: [(start, end), ...]
    out = model.backbone(inputs_embeds=embeds, position_ids=batch.position_ids, audex_segments=segments)

Why hand-written: transformers' ``flash_attention_2`` varlen path needs CUDA, and FlexAttention has no CPU
backward in torch 2.13.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from audex.data.packing import packed_segments  # noqa: F401 (re-exported: the sample spans of a packed batch)

VARLEN_SDPA = "audex_varlen_sdpa"


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers attention interface: ``query [B, H, L, D]``, ``key``/``value [B, H_kv, L, D]`` ->
    ``([B, L, H, D], None)``. With ``audex_segments`` (from :func:`packed_segments`) causal attention runs per
    sample; without, it is transformers' ``sdpa`` attention."""
    segments = kwargs.pop("audex_segments", None)
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, L, D = query.shape
    if len(segments) != B:
        raise ValueError(f"audex_segments lists {len(segments)} rows for a batch of {B}")
    gqa = key.shape[1] != H
    drop = dropout if module.training else 0.0
    rows = []
    for b, spans in enumerate(segments):
        pieces, at = [], 0
        for start, end in spans:
            if start > at:
                pieces.append(query.new_zeros(1, H, start - at, D))
            pieces.append(F.scaled_dot_product_attention(
                query[b:b + 1, :, start:end], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end],
                dropout_p=drop, is_causal=True, scale=scaling, enable_gqa=gqa))
            at = end
        if at < L:
            pieces.append(query.new_zeros(1, H, L - at, D))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register_varlen_attention() -> None:
    """Register ``audex_varlen_sdpa`` with transformers (idempotent); its masks are the ``sdpa`` ones."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    if VARLEN_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def enable_varlen_attention(model) -> bool:
    """Switch the backbone of ``model`` to :data:`VARLEN_SDPA` when it runs SDPA attention (returns whether it
    did). Backbones on another implementation (flash-attention on GPU, eager) are left as they are."""
    backbone = model.backbone
    current = getattr(backbone.config, "_attn_implementation", None)
    if current == VARLEN_SDPA:
        return True
    if current != "sdpa":
        return False
    register_varlen_attention()
    backbone.set_attn_implementation(VARLEN_SDPA)
    return True


def uses_varlen_attention(model) -> bool:
    return getattr(model.backbone.config, "_attn_implementation", None) == VARLEN_SDPA
