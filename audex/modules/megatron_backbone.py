"""Engine ``megatron``: the backbone as a megatron-core model behind the interface of a transformers causal LM.

:class:`MegatronCausalLM` is what ``AudexBackbone.lm`` is when ``model.backbone.engine: megatron``, so
``AudexModel`` is not forked: it calls ``get_input_embeddings()`` (the vocab-parallel table, whole embeddings
out), then the LM with ``inputs_embeds`` (audio frames already merged in) and packed-sample segments, and gets
``.logits`` back, whole over the vocabulary.

* the embeddings enter megatron-core as ``decoder_input`` (Megatron-Bridge's Qwen2-Audio pattern); with sequence
  parallelism this rank's sequence slice is scattered first;
* every row (packed or not) runs in the THD layout: the rows are concatenated, ``cu_seqlens`` marks every
  sample and every padding run as its own segment (``PackedSeqParams``); padding logits are zero; RoPE
  restarts per sample as the packed ``position_ids`` do;
* its ``state_dict()`` holds Hugging Face names and whole tensors (gathered over TP and EP), and
  ``load_state_dict`` takes them, so ``.nemo`` archives of both engines are interchangeable;
  :meth:`save_pretrained` writes a transformers folder.

Generation (KV cache) is not offered here: save the model and generate with engine ``hf``.

Example (tests/parallel/test_megatron_engine.py runs this on CPU)::

    lm = MegatronCausalLM(hf_lm, ParallelismConfig(world_size=2, tensor=2))   # model parallel state set up
    lm(inputs_embeds=lm.get_input_embeddings()(ids), audex_segments=[[(0, 5), (5, 12)]]).logits
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from audex.modules.packed import VARLEN_SDPA
from audex.parallel.config import ParallelismConfig
from audex.parallel.megatron_convert import from_te_names, hf_to_megatron, megatron_to_hf, to_te_names
from audex.parallel.megatron_moe import dispatch_tokens, fix_router_padding_mask
from audex.parallel.megatron_shard import Ranks, gather_whole_state_dict, load_whole_state_dict
from audex.parallel.megatron_specs import build_megatron_model, have_transformer_engine, require_megatron, shard_dims


def spans_from_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[list[tuple[int, int]]]:
    """One span per row: the whole row, or the contiguous run of ones of a ``[B, L]`` padding mask."""
    if attention_mask is None:
        return [[(0, length)] for _ in range(batch)]
    if attention_mask.dim() != 2:
        raise ValueError("engine megatron takes packed segments (audex_segments) or a [B, L] padding mask, not a "
                         f"{attention_mask.dim()}-d attention mask")
    spans = []
    for row in attention_mask.bool().tolist():
        ones = [i for i, v in enumerate(row) if v]
        if ones and ones[-1] - ones[0] + 1 != len(ones):
            raise ValueError("a row's padding mask has holes: pass packed segments (sample_ids) instead")
        spans.append([(ones[0], ones[-1] + 1)] if ones else [])
    return spans


def thd_layout(spans, batch: int, length: int, pad_multiple: int = 1):
    """Every position of every row, in order, as THD segments: each sample is a segment, and so is each run of
    padding between or after them (so every rank of a batch of equal shapes holds equal token counts, as
    megatron-core's expert dispatch and sequence parallelism need). Returns ``cu_seqlens`` (int32), the padding
    flags of the ``t`` tokens, and how many tokens were appended so that ``t`` divides by ``pad_multiple``."""
    cu, padding = [0], []
    for b, row in enumerate(spans):
        at = 0
        for start, end in sorted(row):
            if start < at or end > length or start >= end:
                raise ValueError(f"row {b}: segment ({start}, {end}) overlaps another or leaves the row of {length}")
            for lo, hi, pad in ((at, start, True), (start, end, False)):
                if hi > lo:
                    cu.append(cu[-1] + hi - lo)
                    padding.extend([pad] * (hi - lo))
            at = end
        if at < length:
            cu.append(cu[-1] + length - at)
            padding.extend([True] * (length - at))
    extra = (-cu[-1]) % pad_multiple
    if extra:
        cu.append(cu[-1] + extra)
        padding.extend([True] * extra)
    return torch.tensor(cu, dtype=torch.int32), torch.tensor(padding, dtype=torch.bool), extra


class MegatronCausalLM(nn.Module):
    """A megatron-core ``GPTModel`` / ``MambaModel`` (this rank's shards) loaded from a transformers causal LM.

    Args:
        hf_lm: the transformers model whose config and weights are converted (vocabulary already extended).
        parallelism: the layout; megatron-core's model parallel state must be initialised to it (the strategy of
            :mod:`audex.parallel.megatron_strategy` does that; one process needs ``initialize_model_parallel()``).
        dtype: parameter dtype (default: that of ``hf_lm``).
        overrides: extra ``TransformerConfig`` fields (``model.backbone.megatron``).
        use_te: Transformer Engine specs (default: when ``transformer_engine`` imports).
    """

    def __init__(self, hf_lm, parallelism: ParallelismConfig | None = None, dtype: torch.dtype | None = None,
                 overrides: dict | None = None, use_te: bool | None = None):
        super().__init__()
        require_megatron()
        self.parallelism = parallelism or ParallelismConfig()
        self.config = copy.deepcopy(hf_lm.config)
        self.config._attn_implementation = VARLEN_SDPA  # AudexModel then passes packed rows as segments
        self.dims = shard_dims(self.config)
        dtype = dtype or next(hf_lm.parameters()).dtype
        self.te = have_transformer_engine() if use_te is None else bool(use_te)  # TE specs name some norms apart
        if int(getattr(self.config, "n_routed_experts", 0) or 0):
            fix_router_padding_mask()    # megatron-core 0.16.1's router cannot take the padding mask
        self.mcore = build_megatron_model(self.config, self.parallelism, dtype, overrides, self.te)
        self.load_hf_state_dict(hf_lm.state_dict())
        self._register_state_dict_hook(MegatronCausalLM._hf_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._hf_load_hook)

    # ---- the transformers-like surface -----------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.mcore.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module | None:
        return None if self.mcore.share_embeddings_and_output_weights else self.mcore.output_layer

    @property
    def dtype(self) -> torch.dtype:
        return self.get_input_embeddings().weight.dtype

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                audex_segments=None, past_key_values=None, use_cache: bool = False, **kwargs) -> CausalLMOutputWithPast:
        if past_key_values is not None or use_cache:
            raise NotImplementedError("engine megatron trains; generate after save_pretrained with engine hf")
        if kwargs.get("labels") is not None:
            raise ValueError("engine megatron returns logits; AudexModel.compute_loss takes the loss")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, length, hidden = inputs_embeds.shape
        spans = audex_segments if audex_segments is not None else spans_from_mask(attention_mask, batch, length)
        if len(spans) != batch:
            raise ValueError(f"audex_segments lists {len(spans)} rows for a batch of {batch}")
        p = self.parallelism
        cu, padding, extra = thd_layout(spans, batch, length, p.tensor if p.sequence else 1)
        more = dispatch_tokens(self.mcore.config, int(cu[-1])) - int(cu[-1])   # the MoE all-gather: equal blocks
        if more:
            cu, padding, extra = torch.cat([cu, cu[-1:] + more]), torch.cat([padding, padding.new_ones(more)]), \
                extra + more
        cu, padding = cu.to(inputs_embeds.device), padding.to(inputs_embeds.device)
        tokens = inputs_embeds.reshape(batch * length, hidden)
        if extra:
            tokens = torch.cat([tokens, tokens.new_zeros(extra, hidden)])
        decoder_input, padding_mask = tokens.unsqueeze(1), padding.unsqueeze(1)  # [t, 1, h], [t, 1]
        if p.sequence:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            decoder_input = scatter_to_sequence_parallel_region(decoder_input)
            padding_mask = scatter_to_sequence_parallel_region(padding_mask)
        from megatron.core.packed_seq_params import PackedSeqParams

        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
        # padding runs are routed like tokens but masked out of the expert-bias counts and the load-balancing
        # loss (megatron's [b, t] layout, True = padding; audex.parallel.megatron_moe fixes 0.16.1's router)
        logits = self.mcore(None, None, None, decoder_input=decoder_input, packed_seq_params=packed,
                            padding_mask=padding_mask.transpose(0, 1))  # [1, t, V]
        logits = logits.reshape(-1, logits.shape[-1])[: batch * length]
        out = logits.masked_fill(padding[: batch * length].unsqueeze(1), 0.0)
        return CausalLMOutputWithPast(logits=out.view(batch, length, -1))

    # ---- Hugging Face weights in and out ---------------------------------------------------------
    def _ranks(self) -> Ranks:
        p = self.parallelism
        return Ranks() if (p.tensor, p.expert, p.expert_tensor_size) == (1, 1, 1) else Ranks.from_parallel_state()

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors under Hugging Face names (a collective over the TP and EP groups)."""
        whole = gather_whole_state_dict(self.mcore, self.dims, self._split, self._ranks())
        return megatron_to_hf(from_te_names(whole) if self.te else whole, self.config)

    def load_hf_state_dict(self, hf: dict) -> None:
        """Take this rank's slices of a whole Hugging Face state dict."""
        whole = hf_to_megatron(hf, self.config)
        self._split = load_whole_state_dict(self.mcore, to_te_names(whole, fused_mlp_norm=True) if self.te else whole,
                                            self.dims, self._ranks())

    @staticmethod
    def _hf_state_dict_hook(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + "mcore.")]:
            del state_dict[key]
        for key, value in module.hf_state_dict().items():
            state_dict[prefix + key] = value
        return state_dict

    def _hf_load_hook(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if any(k.startswith(prefix + "mcore.") for k in state_dict):
            return  # already Megatron names (this rank's shards)
        hf = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
        self.load_hf_state_dict(hf)
        for key, value in self.mcore.state_dict(prefix=prefix + "mcore.", keep_vars=True).items():
            state_dict[key] = value.detach() if isinstance(value, torch.Tensor) else value

    def save_pretrained(self, folder, **kwargs):
        """A transformers folder with the gathered weights (every rank calls it; ranks > 0 write nothing)."""
        state = self.hf_state_dict()
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        config = copy.deepcopy(self.config)
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config)
        lm.load_state_dict(state, assign=True, strict=True)
        lm.save_pretrained(folder, **kwargs)


def layout_from_parallel_state() -> ParallelismConfig:
    """The sizes megatron-core's parallel state was initialised with (sequence parallelism is not recorded there:
    pass ``parallelism`` to get it)."""
    require_megatron()
    from megatron.core import parallel_state as ps

    if not (torch.distributed.is_initialized() and ps.model_parallel_is_initialized()):
        raise RuntimeError("engine megatron needs torch.distributed and megatron-core's model parallel state: call "
                           "audex.parallel.megatron_strategy.init_model_parallel(...) first (MegatronStrategy does)")
    return ParallelismConfig(
        world_size=torch.distributed.get_world_size(), tensor=ps.get_tensor_model_parallel_world_size(),
        context=ps.get_context_parallel_world_size(), pipeline=ps.get_pipeline_model_parallel_world_size(),
        expert=ps.get_expert_model_parallel_world_size(), expert_tensor=ps.get_expert_tensor_parallel_world_size())


def megatron_lm(hf_lm, parallelism=None, dtype=None, overrides=None) -> MegatronCausalLM:
    """:class:`MegatronCausalLM` for ``AudexBackbone``: the layout from ``parallelism`` (a dict or config) or, when
    None, from megatron-core's initialised parallel state."""
    if parallelism is None:
        p = layout_from_parallel_state()
    else:
        p = parallelism if isinstance(parallelism, ParallelismConfig) else ParallelismConfig.from_dict(parallelism)
    return MegatronCausalLM(hf_lm, p, dtype=dtype, overrides=overrides)
