"""Packing-aware model code: a packed row (several samples, see :mod:`audex.data.collate`) behaves exactly as if
each sample ran alone.

* :func:`packed_segments` -- the ``(start, end)`` span of every sample of each row, from ``sample_ids``.
* :func:`packed_attention_mask` -- the dense additive ``[B, 1, L, L]`` mask: causal within each sample only.
* ``audex_varlen_sdpa`` (:func:`enable_varlen_attention`) -- attention that costs sum_j n_j^2, not L^2.
* :class:`MambaSpanReset` -- Mamba mixers restart their recurrent state at every sample boundary.

``AudexModel.forward(..., sample_ids=...)`` uses all of them; nothing else needs to know about packing.

**Varlen attention.** A packed row of length L holding samples of lengths n_1..n_k needs only the k diagonal
blocks of the causal attention matrix. The dense mask still makes SDPA compute all L^2 scores and then discard
most of them, which on the tiny model makes a packed row of 1,024 tokens slower per real token than padded
batches (``bench/train_throughput.py``). Megatron/Transformer Engine avoid this with the THD layout
(``cu_seqlens``) and flash-attention's varlen kernels; ``audex_varlen_sdpa`` is the same idea for any device: a
transformers attention function that runs causal SDPA on every sample's span (``is_causal=True``, GQA native)
and leaves padding positions at zero. Without segment information (generation, unpacked batches) it is exactly
transformers' own ``sdpa`` attention with the usual masks, so a backbone switched to it stays a normal model.
Why hand-written: transformers' ``flash_attention_2`` varlen path needs CUDA, and FlexAttention has no CPU
backward in torch 2.13.

**Mamba span reset.** transformers' Nemotron-H mixer takes no per-token sequence ids (mamba-ssm's ``seq_idx``),
so a packed row would carry one sample's state into the next. While spans are set, each mixer instead runs once
per sample span of the row and the outputs are stitched back: exact, and the token layout seen by attention,
MoE routers and the loss is unchanged.

Example::

    enable_varlen_attention(model.backbone)             # once, for SDPA backbones (Llama family)
    segments = packed_segments(batch.sample_ids)        # per row: [(start, end), ...]
    out = model.backbone(inputs_embeds=embeds, position_ids=batch.position_ids, audex_segments=segments)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

VARLEN_SDPA = "audex_varlen_sdpa"
Spans = list[list[tuple[int, int]]]


def packed_segments(sample_ids: torch.Tensor) -> Spans:
    """``[B, L]`` sample ids (-1 = padding) -> per row the ``(start, end)`` span of each sample, in order."""
    spans = []
    for row in sample_ids.tolist():
        row_spans, start = [], None
        for i, sid in enumerate(row + [-2]):
            if start is not None and sid != row[start]:
                row_spans.append((start, i))
                start = None
            if start is None and i < len(row) and sid >= 0:
                start = i
        spans.append(row_spans)
    return spans


def packed_attention_mask(sample_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] sample ids (-1 = padding) -> additive [B, 1, L, L] mask: causal within each sample only."""
    L = sample_ids.shape[1]
    same = sample_ids.unsqueeze(2) == sample_ids.unsqueeze(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=sample_ids.device).tril()
    valid = (sample_ids >= 0).unsqueeze(2) & (sample_ids >= 0).unsqueeze(1)
    allowed = same & causal & valid
    allowed |= torch.eye(L, dtype=torch.bool, device=sample_ids.device)  # padding rows attend to themselves
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sample_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


# ---- varlen attention --------------------------------------------------------------------------------
def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers attention interface: ``query [B, H, L, D]``, ``key``/``value [B, H_kv, L, D]`` ->
    ``([B, L, H, D], None)``. With ``audex_segments`` (from :func:`packed_segments`) causal attention runs per
    sample; without, it is transformers' ``sdpa`` attention."""
    segments = kwargs.pop("audex_segments", None)
    if segments is None:
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
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    if VARLEN_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)


def enable_varlen_attention(backbone) -> bool:
    """Switch a transformers causal LM to :data:`VARLEN_SDPA` when it runs SDPA attention (returns whether it
    did). Backbones on another implementation (flash-attention on GPU, eager) are left as they are."""
    current = getattr(backbone.config, "_attn_implementation", None)
    if current == VARLEN_SDPA:
        return True
    if current != "sdpa":
        return False
    register_varlen_attention()
    backbone.set_attn_implementation(VARLEN_SDPA)
    return True


def uses_varlen_attention(backbone) -> bool:
    return getattr(backbone.config, "_attn_implementation", None) == VARLEN_SDPA


# ---- Mamba span reset ----------------------------------------------------------------------------------
class MambaSpanReset:
    """Make every Mamba mixer of ``backbone`` restart its recurrent (conv and SSM) state at packed-sample
    boundaries while :meth:`spans` is active (see the module docstring). ``active`` is False for backbones
    without Mamba mixers."""

    def __init__(self, backbone: torch.nn.Module):
        self._spans: Spans | None = None
        self.mixers = [m for m in backbone.modules() if type(m).__name__.endswith("Mamba2Mixer")]
        for module in self.mixers:
            module.forward = self._wrap(module.forward)

    @property
    def active(self) -> bool:
        return bool(self.mixers)

    def _wrap(self, original):
        def forward(hidden_states, cache_params=None, attention_mask=None, **kw):
            spans = self._spans
            if spans is None or cache_params is not None:
                return original(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kw)
            out = torch.zeros_like(hidden_states)  # padding positions stay zero (masked everywhere)
            for b, row_spans in enumerate(spans):
                for s, e in row_spans:
                    out[b:b + 1, s:e] = original(hidden_states[b:b + 1, s:e], **kw)
            return out

        return forward

    @contextmanager
    def spans(self, spans: Spans | None):
        """Within the block, mixers run per span of ``spans`` (None: as usual)."""
        self._spans = spans
        try:
            yield
        finally:
            self._spans = None
