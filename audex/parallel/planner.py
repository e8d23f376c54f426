"""Dry run of a parallel layout: what each GPU holds, computed on the meta device (no weights allocated).

``plan_layout(model_cfg, parallelism, packing=True, max_length=262144)`` builds the model with
:func:`audex.models.sizing.build_on_meta`, refuses layouts the model or the data cannot be split by
(:class:`ParallelismError`) and returns a :class:`LayoutPlan`; :func:`format_plan` prints it. For the paper's
layout (``parallelism=paper``: 512 GPUs, TP4 · EP32 · CP8 · SP) on the 30B-A3B: DP 16, 4 experts per rank,
32,768 of 262,144 tokens per rank, samples padded to 64 = 2·CP·TP, 16 Mamba heads per rank, each of the 2 KV
heads replicated on 2 TP ranks.

The memory figures are an estimate (GiB per GPU, micro-batch of one packed row):

* weights BF16 (2 B/parameter); gradients FP32 main grads (4 B); AdamW FP32 master + two moments (12 B),
  sharded over data x context ranks (experts: over the expert-data ranks) with the distributed optimizer,
  else over ``fsdp``. Dense and Mamba weights split over TP x PP, routed experts over EP x expert-TP x PP.
  The audio encoder is frozen (weights only), the adapter trains; both are replicated. Codecs are not part of
  training (TTS/TTA targets are pre-tokenised), so they are not counted.
* activations: BF16 tensors that backward keeps, per token and layer kind (Korthikanti et al. 2022's
  accounting, flash attention so no s² term), x tokens per CP rank, / TP with sequence parallelism (without
  it the norm inputs stay whole); FP32 vocab-parallel logits for the loss. Full recomputation keeps each
  layer's input only plus one layer's activations being recomputed. With PP, the first stage holds PP
  micro-batches (1F1B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from audex.models.sizing import build_on_meta
from audex.parallel.config import ModelDims, ParallelismConfig, ParallelismError

GIB = 1024 ** 3
LAYER_KIND = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}   # Nemotron-H hybrid_override_pattern


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def layer_kinds(lm_config) -> list[str]:
    """Per layer: ``mamba``, ``moe``, ``attention`` or ``mlp``; a Llama-family layer is ``attention+mlp``."""
    pattern = getattr(lm_config, "hybrid_override_pattern", None)
    if pattern:
        unknown = sorted(set(pattern) - set(LAYER_KIND))
        if unknown:
            raise ParallelismError(f"hybrid_override_pattern has unknown layer symbols {unknown}")
        return [LAYER_KIND[c] for c in pattern]
    return ["attention+mlp"] * int(lm_config.num_hidden_layers)


def model_dims(backbone) -> ModelDims:
    """The sizes a layout must divide, from an :class:`AudexBackbone` (vocabulary already extended)."""
    c = backbone.lm.config
    kinds = layer_kinds(c)
    has_mamba = "mamba" in kinds
    return ModelDims(
        num_attention_heads=int(c.num_attention_heads),
        num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
        # engine megatron's table is this rank's vocab shard; its config holds the whole (extended) size
        vocab_size=int(c.vocab_size) if getattr(backbone, "engine", "hf") == "megatron"
        else int(backbone.lm.get_input_embeddings().weight.shape[0]),
        hidden_size=int(c.hidden_size), num_layers=len(kinds),
        mamba_num_heads=int(c.mamba_num_heads) if has_mamba else 0,
        mamba_groups=int(c.n_groups) if has_mamba else 0,
        num_experts=int(getattr(c, "n_routed_experts", 0) or getattr(c, "num_local_experts", 0) or 0),
        experts_per_token=int(getattr(c, "num_experts_per_tok", 0) or 0))


def routed_expert_params(lm) -> int:
    """Parameters of the routed experts (what expert parallelism splits); routers and shared experts excluded."""
    return sum(_numel(m.experts) for m in lm.modules() if hasattr(m, "experts") and hasattr(m, "gate"))


def activation_bytes_per_token(lm_config, kind: str) -> tuple[int, int]:
    """``(split, whole)`` BF16 bytes per token that backward keeps for one layer: ``split`` is divided over TP
    ranks always, ``whole`` (the norm input) only with sequence parallelism."""
    c, h = lm_config, int(lm_config.hidden_size)
    whole, split = 2 * h, 0
    for part in kind.split("+"):
        if part == "attention":
            d = int(getattr(c, "head_dim", None) or h // c.num_attention_heads)
            q, kv = c.num_attention_heads * d, int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * d
            split += 2 * (q + 2 * kv) + 2 * q + 2 * h            # Q, K, V (flash inputs), flash output, out-proj input
            whole += 2 * h if part != kind else 0                 # a second norm input in a fused attention+mlp layer
        elif part == "mlp":
            f = int(c.intermediate_size)
            split += 2 * (2 * f) + 2 * f                          # gate and up projections, activation output
        elif part == "moe":
            f, k = int(c.moe_intermediate_size), int(c.num_experts_per_tok)
            fs = int(getattr(c, "moe_shared_expert_intermediate_size", 0) or 0) * int(getattr(c, "n_shared_experts", 0) or 0)
            split += k * (2 * h + 2 * f + 2 * f) + (2 * fs + 2 * fs)   # dispatched copies, fc1 and activation outputs
        elif part == "mamba":
            d_inner = int(c.mamba_num_heads) * int(c.mamba_head_dim)
            groups = 2 * int(c.n_groups) * int(c.ssm_state_size)
            split += 2 * (2 * d_inner + groups + int(c.mamba_num_heads))   # in_proj output (z, x, B, C, dt)
            split += 2 * (d_inner + groups) + 3 * 2 * d_inner              # conv output, y, gated norm, out_proj input
        else:
            raise ParallelismError(f"unknown layer kind {part!r}")
    return split, whole


@dataclass
class LayoutPlan:
    """What one GPU holds under a layout (see the module docstring for the accounting)."""

    model: str
    parallelism: ParallelismConfig
    dims: ModelDims
    max_length: int
    tokens_per_rank: int
    attention_heads_per_rank: int
    kv_heads_per_rank: int
    kv_head_replicas: int                 # TP ranks holding a copy of each KV head (1 = no replication)
    mamba_heads_per_rank: int
    mamba_groups_per_rank: int
    experts_per_rank: int
    vocab_rows_per_rank: int
    params_per_rank: int
    trainable_params_per_rank: int
    memory_gib: dict[str, float] = field(default_factory=dict)


def plan_layout(model_cfg, parallelism: ParallelismConfig, packing: bool = True, max_length: int = 262144,
                model_name: str = "model", micro_batch_rows: int = 1) -> LayoutPlan:
    """Check ``parallelism`` against the model config and the data, and compute the per-GPU layout."""
    p = parallelism
    if p.world_size is None:
        raise ParallelismError("parallelism.world_size is null: the planner needs the GPU count (e.g. "
                               "parallelism.world_size=512)")
    _vocab, encoder, adapter, backbone = build_on_meta(model_cfg)
    lm = backbone.lm
    dims = model_dims(backbone)
    p.check_model(dims)
    p.check_data(packing, max_length)
    tp, cp, pp = p.tensor, p.context, p.pipeline
    experts = routed_expert_params(lm)
    dense = _numel(backbone) - experts
    expert_split = p.expert * p.expert_tensor_size * pp
    backbone_rank = dense // (tp * pp) + experts // expert_split
    adapter_n, encoder_n = _numel(adapter), _numel(encoder)
    weights = 2 * (backbone_rank + adapter_n + encoder_n) / p.fsdp
    trainable = backbone_rank + adapter_n
    grads = 4 * trainable / p.fsdp
    dense_shard = p.data * cp if p.distributed_optimizer else p.fsdp
    expert_shard = p.expert_data if p.distributed_optimizer else p.fsdp
    optim = 12 * (dense // (tp * pp) / dense_shard + experts // expert_split / expert_shard + adapter_n / dense_shard)

    tokens = max_length // cp
    kinds = layer_kinds(lm.config)
    per_layer = [activation_bytes_per_token(lm.config, k) for k in kinds]
    seq_div = tp if p.sequence else 1
    stored = sum(split / tp + whole / seq_div for split, whole in per_layer) * tokens / pp
    logits = 4 * tokens * dims.vocab_size / tp
    one_layer = max(split / tp + whole / seq_div for split, whole in per_layer) * tokens
    recompute = (len(kinds) / pp * 2 * dims.hidden_size / seq_div) * tokens + one_layer
    in_flight = micro_batch_rows * pp
    memory = {"weights": weights / GIB, "grads": grads / GIB, "optimizer": optim / GIB,
              "activations": (stored + logits) * in_flight / GIB,
              "activations_recompute": (recompute + logits) * in_flight / GIB}
    memory["total"] = memory["weights"] + memory["grads"] + memory["optimizer"] + memory["activations"]
    memory["total_recompute"] = memory["total"] - memory["activations"] + memory["activations_recompute"]
    kv = dims.num_key_value_heads
    return LayoutPlan(
        model=model_name, parallelism=p, dims=dims, max_length=max_length, tokens_per_rank=tokens,
        attention_heads_per_rank=dims.num_attention_heads // tp, kv_heads_per_rank=max(kv // tp, 1),
        kv_head_replicas=max(tp // kv, 1), mamba_heads_per_rank=dims.mamba_num_heads // tp,
        mamba_groups_per_rank=dims.mamba_groups // tp,
        experts_per_rank=dims.num_experts // p.expert if dims.num_experts else 0,
        vocab_rows_per_rank=dims.vocab_size // tp, params_per_rank=int(backbone_rank + adapter_n + encoder_n),
        trainable_params_per_rank=int(trainable), memory_gib=memory)


def format_plan(plan: LayoutPlan) -> str:
    """The layout as text, one fact per line."""
    p, d = plan.parallelism, plan.dims
    sp = " (+ sequence parallel)" if p.sequence else ""
    lines = [f"Audex layout for {plan.model} (dry run on the meta device, nothing allocated)",
             f"world {p.world_size} = TP {p.tensor} x CP {p.context} x PP {p.pipeline} x DP {p.data}{sp}"
             f"{f'; FSDP shards of {p.fsdp} inside DP' if p.fsdp > 1 else ''}",
             f"tokens: {plan.tokens_per_rank:,} of {plan.max_length:,} per packed row on each CP rank"
             + (f" ({plan.tokens_per_rank // p.tensor:,} per TP rank in sequence-parallel regions)" if p.sequence else "")]
    if p.context > 1 or p.sequence:
        rule = f"2 x CP {p.context}" + (f" x TP {p.tensor}" if p.sequence else "") if p.context > 1 else f"TP {p.tensor}"
        lines.append(f"sample padding: every packed sample padded to a multiple of {p.sample_pad_multiple} ({rule})")
    lines.append(f"attention: {d.num_attention_heads} heads -> {plan.attention_heads_per_rank} per TP rank; "
                 f"{d.num_key_value_heads} KV heads -> " + (
                     f"each replicated on {plan.kv_head_replicas} TP ranks (KV heads < TP)" if plan.kv_head_replicas > 1
                     else f"{plan.kv_heads_per_rank} per TP rank"))
    if d.mamba_num_heads:
        lines.append(f"mamba: {d.mamba_num_heads} heads -> {plan.mamba_heads_per_rank} per TP rank; {d.mamba_groups} "
                     f"groups -> {plan.mamba_groups_per_rank} per TP rank")
    if d.num_experts:
        lines.append(f"experts: {d.num_experts} routed (top-{d.experts_per_token}) -> {plan.experts_per_rank} per rank "
                     f"at EP {p.expert} (expert TP {p.expert_tensor_size}, expert DP {p.expert_data})")
    lines.append(f"vocabulary: {d.vocab_size:,} rows -> {plan.vocab_rows_per_rank:,} per TP rank")
    lines.append(f"parameters per GPU: {plan.params_per_rank / 1e9:.3f}B ({plan.trainable_params_per_rank / 1e9:.3f}B "
                 "trainable, the frozen audio encoder replicated)")
    m = plan.memory_gib
    shard = f"DP x CP = {p.data * p.context}" if p.distributed_optimizer else f"FSDP {p.fsdp}"
    rows = [("weights (BF16)", m["weights"]), ("gradients (FP32 main grads)", m["grads"]),
            (f"optimizer (AdamW FP32, sharded over {shard})", m["optimizer"]),
            ("activations, no recomputation", m["activations"]),
            ("activations, full recomputation", m["activations_recompute"])]
    lines.append("memory per GPU (estimate, GiB; one packed row per micro-batch):")
    lines += [f"  {label:<52}{value:8.2f}" for label, value in rows]
    lines.append(f"  total: {m['total']:.2f} without recomputation, {m['total_recompute']:.2f} with")
    return "\n".join(lines)
