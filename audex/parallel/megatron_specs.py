"""megatron-core models from a transformers backbone config: ``TransformerConfig``, layer specs, and the model.

* Llama (dense 2B) -> ``GPTModel`` (RoPE, RMSNorm, SwiGLU, GQA);
* Nemotron-H (30B-A3B) -> ``MambaModel`` with the config's layer pattern (``M`` Mamba2, ``*`` attention,
  ``-`` MLP, ``E`` MoE): squared-ReLU experts, sigmoid router with the aux-loss-free expert bias
  (``moe_router_enable_expert_bias``) and score scaling (``routed_scaling_factor``, 2.5 in the paper), a
  shared expert, top-k normalised, no positional embedding;

with Transformer Engine layer specs when ``transformer_engine`` imports, megatron-core's local specs otherwise.
Packed rows always run in the THD layout (``PackedSeqParams``): TE's attention takes ``cu_seqlens`` natively;
megatron-core's local ``DotProductAttention`` refuses packed input, so the local specs use
:class:`PackedSDPAttention` (causal SDPA per sample; the same idea as ``audex.modules.packed``'s varlen SDPA,
written against Megatron's ``[t, heads, dim]`` layout). Mamba mixers need ``mamba_ssm`` / ``causal_conv1d``
kernels (CUDA) in every spec.

megatron-core is imported inside functions: it is an optional extra (``pip install audex[megatron]``).
"""

from __future__ import annotations

import dataclasses
import warnings
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.nn.functional as F

from audex.parallel.config import ParallelismConfig
from audex.parallel.megatron_convert import LLAMA, hybrid_pattern, model_type_of
from audex.parallel.megatron_shard import ShardDims

MIN_MCORE, TESTED_MCORE = (0, 16), "0.16"


def require_megatron() -> str:
    """The installed megatron-core version, or a clear error naming the install command. Releases after the
    tested 0.16 line warn once: their layer specs and routers may have moved."""
    try:
        found = version("megatron-core")
    except PackageNotFoundError:
        raise ImportError("model.backbone.engine=megatron needs megatron-core: pip install 'audex[megatron]' "
                          "(megatron-core 0.16 on Python 3.11; later releases need Python >= 3.12)") from None
    parts = tuple(int(x) for x in found.split(".")[:2] if x.isdigit())
    if parts < MIN_MCORE:
        raise ImportError(f"megatron-core {found} is too old for engine megatron: need >= "
                          f"{'.'.join(map(str, MIN_MCORE))} (pip install 'audex[megatron]')")
    if not found.startswith(TESTED_MCORE + "."):
        warnings.warn(f"engine megatron is written and tested against megatron-core {TESTED_MCORE}.x; megatron-core "
                      f"{found} is untested (pip install 'megatron-core>=0.16.1,<0.17' for the tested one)", stacklevel=2)
    return found


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise NotImplementedError(f"engine megatron maps the default RoPE only, this backbone has rope_type={kind!r}; "
                                  "use model.backbone.engine=hf")
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def transformer_config(cfg, p: ParallelismConfig, dtype: torch.dtype = torch.float32, overrides: dict | None = None):
    """megatron-core ``TransformerConfig`` for a transformers Llama or Nemotron-H config and a layout.

    ``overrides``: extra ``TransformerConfig`` fields (``model.backbone.megatron``), e.g. the router's
    ``moe_router_bias_update_rate`` (1e-3) and ``moe_aux_loss_coeff`` (1e-6) of section 4.3."""
    require_megatron()
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    kind = model_type_of(cfg)
    heads = int(cfg.num_attention_heads)
    common = dict(
        num_layers=len(hybrid_pattern(cfg)), hidden_size=int(cfg.hidden_size), num_attention_heads=heads,
        num_query_groups=int(getattr(cfg, "num_key_value_heads", None) or heads),
        kv_channels=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor, sequence_parallel=p.sequence, context_parallel_size=p.context,
        pipeline_model_parallel_size=p.pipeline, expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor_size, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, use_cpu_initialization=True, perform_initialization=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, recompute_granularity="full" if p.recompute else None,
        recompute_method="uniform" if p.recompute else None, recompute_num_layers=1 if p.recompute else None)
    if kind == LLAMA:
        common.update(ffn_hidden_size=int(cfg.intermediate_size), layernorm_epsilon=float(cfg.rms_norm_eps),
                      gated_linear_unit=True, activation_func=F.silu)
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise NotImplementedError("engine megatron maps bias-free Llama layers only (attention_bias/mlp_bias)")
    else:
        if not getattr(cfg, "norm_topk_prob", True):
            raise NotImplementedError("Megatron's sigmoid router normalises the top-k scores: norm_topk_prob must be true")
        experts = int(getattr(cfg, "n_routed_experts", 0) or 0)
        common.update(
            ffn_hidden_size=int(cfg.intermediate_size), layernorm_epsilon=float(cfg.layer_norm_epsilon),
            gated_linear_unit=False, activation_func=squared_relu,
            mamba_state_dim=int(cfg.ssm_state_size), mamba_head_dim=int(cfg.mamba_head_dim),
            mamba_num_groups=int(cfg.n_groups), mamba_num_heads=int(cfg.mamba_num_heads))
        if experts:
            common.update(
                num_moe_experts=experts, moe_router_topk=int(cfg.num_experts_per_tok),
                moe_ffn_hidden_size=int(cfg.moe_intermediate_size),
                moe_shared_expert_intermediate_size=int(cfg.moe_shared_expert_intermediate_size)
                * int(getattr(cfg, "n_shared_experts", 1) or 1) if getattr(cfg, "n_shared_experts", 0) else None,
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_topk_scaling_factor=float(cfg.routed_scaling_factor), moe_router_dtype="fp32",
                moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-6,
                moe_router_bias_update_rate=1e-3,
                # all-to-all dispatch uses CUDA streams; the all-gather dispatcher runs anywhere
                moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
                moe_grouped_gemm=have_transformer_engine(), moe_permute_fusion=False)
    unknown = sorted(set(overrides or {}) - {f.name for f in dataclasses.fields(TransformerConfig)})
    if unknown:
        raise ValueError(f"model.backbone.megatron has keys {unknown} that TransformerConfig does not know")
    common.update(overrides or {})
    return TransformerConfig(**common)


def shard_dims(cfg) -> ShardDims:
    """What :mod:`audex.parallel.megatron_shard` needs to split stacked rows."""
    if model_type_of(cfg) == LLAMA:
        return ShardDims(gated_mlp=True)
    heads, head_dim = int(cfg.mamba_num_heads), int(cfg.mamba_head_dim)
    return ShardDims(mamba_inner=heads * head_dim, mamba_bc=int(cfg.n_groups) * int(cfg.ssm_state_size),
                     mamba_heads=heads, num_experts=int(getattr(cfg, "n_routed_experts", 0) or 0))


class PackedSDPAttention(torch.nn.Module):
    """Local-spec core attention for THD rows: causal SDPA on each ``cu_seqlens`` segment (GQA native).
    ``query [t, heads/TP, d]``, ``key``/``value [t, groups/TP, d]`` -> ``[t, heads/TP · d]``. Takes the
    arguments megatron-core passes to ``DotProductAttention``."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        if config.context_parallel_size > 1:
            raise NotImplementedError("context parallelism in engine megatron needs Transformer Engine's "
                                      "attention (GPU); the local spec runs CP=1")
        self.config = config
        self.scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError("PackedSDPAttention takes THD rows (PackedSeqParams with qkv_format='thd')")
        cu = packed_seq_params.cu_seqlens_q.tolist()
        drop = self.dropout if self.training else 0.0
        out = []
        for start, end in zip(cu[:-1], cu[1:]):
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=self.scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
            out.append(o[0].transpose(0, 1))
        o = torch.cat(out, dim=0)
        return o.reshape(o.shape[0], -1)


def _with_packed_attention(spec):
    """A local attention spec with :class:`PackedSDPAttention` as core attention."""
    attention = dataclasses.replace(spec.submodules.self_attention.submodules,
                                    core_attention=PackedSDPAttention)
    self_attention = dataclasses.replace(spec.submodules.self_attention, submodules=attention)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=self_attention))


def gpt_layer_spec(num_experts: int | None = None, use_te: bool | None = None):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te if use_te is not None else have_transformer_engine():
        return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=bool(num_experts))
    return _with_packed_attention(specs.get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm"))


def hybrid_stack_spec(use_te: bool | None = None, with_mamba: bool = True):
    """Megatron's Mamba/attention/MLP/MoE stack spec: the TE one (``mamba_stack_spec``) or its local twin.
    ``with_mamba=False`` (a pattern without ``M``) leaves the Mamba layer out of the local spec: megatron-core's
    mixer module imports triton, which CPU hosts lack."""
    if use_te if use_te is not None else have_transformer_engine():
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

        return mamba_stack_spec
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    dense = _with_packed_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    sub = dense.submodules
    norm = sub.input_layernorm
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=sub.self_attention, self_attn_bda=sub.self_attn_bda))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm, mlp=sub.mlp, mlp_bda=sub.mlp_bda))
    moe = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm, mlp=get_moe_module_spec(use_te=False, num_experts=8), mlp_bda=sub.mlp_bda))
    parts = dict(attention_layer=attention, mlp_layer=mlp, moe_layer=moe)
    if with_mamba:
        from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules

        parts["mamba_layer"] = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=norm, mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)), mamba_bda=sub.mlp_bda))
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(**parts))


def build_megatron_model(cfg, p: ParallelismConfig, dtype: torch.dtype = torch.float32, overrides: dict | None = None,
                         use_te: bool | None = None):
    """The megatron-core model for a transformers config (``GPTModel`` or ``MambaModel``), this rank's shards,
    weights uninitialised (they are loaded from the HF weights). Model parallel state must be initialised."""
    if p.sequence and not (use_te if use_te is not None else have_transformer_engine()):
        raise NotImplementedError("parallelism.sequence=true in engine megatron needs Transformer Engine's norms (GPU): "
                                  "megatron-core's torch norm refuses sequence parallelism; set sequence=false")
    tc = transformer_config(cfg, p, dtype, overrides)
    vocab, tied = int(cfg.vocab_size), bool(getattr(cfg, "tie_word_embeddings", False))
    seq = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
    if model_type_of(cfg) == LLAMA:
        from megatron.core.models.gpt.gpt_model import GPTModel

        return mark_tensor_parallel(GPTModel(
            tc, gpt_layer_spec(None, use_te), vocab_size=vocab, max_sequence_length=seq, parallel_output=False,
            share_embeddings_and_output_weights=tied, position_embedding_type="rope", rotary_base=_rope_theta(cfg),
            scatter_embedding_sequence_parallel=False))
    from megatron.core.models.mamba.mamba_model import MambaModel

    return mark_tensor_parallel(MambaModel(
        tc, hybrid_stack_spec(use_te, "M" in hybrid_pattern(cfg)), vocab_size=vocab, max_sequence_length=seq,
        hybrid_override_pattern=hybrid_pattern(cfg), parallel_output=False, share_embeddings_and_output_weights=tied,
        position_embedding_type="none", scatter_embedding_sequence_parallel=False))


def mark_tensor_parallel(model):
    """Set megatron's ``tensor_model_parallel`` attributes on the split weights. megatron-core 0.16.1 sets them only
    while initialising weights (``perform_initialization``), which this build skips (the weights come from the HF
    checkpoint); without them every grad-norm over TP ranks (megatron's clipping, ``clip_grads_global``) counts a
    TP shard as a replicated tensor, on TP rank 0 only."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        dim = 1 if isinstance(module, RowParallelLinear) else \
            0 if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)) else None
        weight = getattr(module, "weight", None)
        if dim is not None and isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, getattr(module, "stride", 1))
    return model
