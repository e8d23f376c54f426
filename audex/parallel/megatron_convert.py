"""Hugging Face <-> megatron-core weight conversion for Llama (``GPTModel``) and Nemotron-H (``MambaModel``).

Pure tensor arithmetic on whole (unsharded) state dicts, so it runs without megatron-core installed; the naming
and layouts follow Megatron-Bridge's mappings (``QKVMapping``, ``GatedMLPMapping``, Nemotron-H's Mamba and
expert mappings):

* attention: HF ``q/k/v_proj`` -> one ``linear_qkv`` with rows interleaved per KV group
  ``[q heads of group g, k_g, v_g]`` for g = 0..groups-1 (Megatron's layout, which TP then splits by group);
* gated MLP (Llama): ``[gate_proj; up_proj]`` -> ``linear_fc1`` (TP splits each half, see
  :func:`audex.parallel.megatron_shard.tp_parts`);
* Mamba2 (Nemotron-H): ``in_proj`` rows ``[z, x, B, C, dt]`` and ``conv1d`` channels ``[x, B, C]`` are already
  in Megatron's order at TP=1, so they are renamed, not reshuffled;
* MoE (Nemotron-H): HF's fused ``experts.up_proj [E, F, H]`` / ``down_proj [E, H, F]`` -> one
  ``local_experts.{e}.linear_fc1/linear_fc2`` per expert; the router's ``e_score_correction_bias`` is Megatron's
  aux-loss-free ``expert_bias``.

The Megatron names are those of the local layer specs (``input_layernorm``, ``pre_mlp_layernorm``, ``norm`` as
modules); :func:`to_te_names` / :func:`from_te_names` translate to Transformer Engine specs, whose fused
``LayerNorm*Linear`` modules own the norm weight (``linear_qkv.layer_norm_weight``) and whose grouped experts
are ``experts.linear_fc1.weight{e}``.

Example::

    mc = hf_to_megatron(hf_lm.state_dict(), hf_lm.config)       # whole Megatron state dict (TP=1, EP=1)
    back = megatron_to_hf(mc, hf_lm.config)                      # == hf_lm.state_dict(), bit for bit
"""

from __future__ import annotations

import re

import torch

LLAMA, NEMOTRON_H = "llama", "nemotron_h"
SUPPORTED = (LLAMA, NEMOTRON_H)
_MAMBA, _ATTN, _MLP, _MOE = "M", "*", "-", "E"
#: Nemotron-H's ``layers_block_type`` names -> Megatron's hybrid pattern symbols
_BLOCK_SYMBOL = {"mamba": _MAMBA, "linear_attention": _MAMBA, "attention": _ATTN, "full_attention": _ATTN,
                 "mlp": _MLP, "moe": _MOE}


def model_type_of(hf_config) -> str:
    kind = getattr(hf_config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"engine megatron converts {list(SUPPORTED)} backbones, not model_type={kind!r}: use "
                         "model.backbone.engine=hf for it")
    return kind


def hybrid_pattern(hf_config) -> str:
    """Megatron's ``hybrid_override_pattern`` (``M`` Mamba, ``*`` attention, ``-`` MLP, ``E`` MoE) of a config."""
    if model_type_of(hf_config) == LLAMA:
        return _ATTN * int(hf_config.num_hidden_layers)
    types = getattr(hf_config, "layers_block_type", None) or getattr(hf_config, "layer_types", None)
    unknown = sorted({str(t) for t in types} - set(_BLOCK_SYMBOL))
    if unknown:
        raise ValueError(f"Nemotron-H layer kinds {unknown} have no Megatron layer; known: {sorted(_BLOCK_SYMBOL)}")
    return "".join(_BLOCK_SYMBOL[str(t)] for t in types)


def _heads(cfg) -> tuple[int, int, int]:
    heads = int(cfg.num_attention_heads)
    groups = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return heads, groups, head_dim


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg) -> torch.Tensor:
    """HF q/k/v projections -> Megatron ``linear_qkv`` (rows interleaved per KV group)."""
    heads, groups, d = _heads(cfg)
    per = heads // groups
    hidden = q.shape[-1]
    q = q.reshape(groups, per * d, hidden)
    k, v = k.reshape(groups, d, hidden), v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv`."""
    heads, groups, d = _heads(cfg)
    per = heads // groups
    hidden = qkv.shape[-1]
    qkv = qkv.reshape(groups, (per + 2) * d, hidden)
    q, k, v = torch.split(qkv, [per * d, d, d], dim=1)
    return q.reshape(-1, hidden).clone(), k.reshape(-1, hidden).clone(), v.reshape(-1, hidden).clone()


def _llama_layer_to_mc(hf: dict, i: int, cfg) -> dict:
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    a = p + "self_attn."
    return {
        m + "input_layernorm.weight": hf[p + "input_layernorm.weight"],
        m + "self_attention.linear_qkv.weight": merge_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"],
                                                          hf[a + "v_proj.weight"], cfg),
        m + "self_attention.linear_proj.weight": hf[a + "o_proj.weight"],
        m + "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"],
        m + "mlp.linear_fc1.weight": torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]),
        m + "mlp.linear_fc2.weight": hf[p + "mlp.down_proj.weight"],
    }


def _llama_layer_to_hf(mc: dict, i: int, cfg) -> dict:
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    q, k, v = split_qkv(mc[m + "self_attention.linear_qkv.weight"], cfg)
    gate, up = torch.chunk(mc[m + "mlp.linear_fc1.weight"], 2, dim=0)
    return {
        p + "input_layernorm.weight": mc[m + "input_layernorm.weight"],
        p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
        p + "self_attn.o_proj.weight": mc[m + "self_attention.linear_proj.weight"],
        p + "post_attention_layernorm.weight": mc[m + "pre_mlp_layernorm.weight"],
        p + "mlp.gate_proj.weight": gate.clone(), p + "mlp.up_proj.weight": up.clone(),
        p + "mlp.down_proj.weight": mc[m + "mlp.linear_fc2.weight"],
    }


#: Nemotron-H Mamba mixer tensors that keep their shape: HF suffix -> Megatron suffix
_MAMBA_SAME = {"mixer.in_proj.weight": "mixer.in_proj.weight", "mixer.conv1d.weight": "mixer.conv1d.weight",
               "mixer.conv1d.bias": "mixer.conv1d.bias", "mixer.A_log": "mixer.A_log", "mixer.D": "mixer.D",
               "mixer.dt_bias": "mixer.dt_bias", "mixer.norm.weight": "mixer.norm.weight",
               "mixer.out_proj.weight": "mixer.out_proj.weight", "norm.weight": "norm.weight"}


def _nemotron_layer_to_mc(hf: dict, i: int, kind: str, cfg) -> dict:
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    if kind == _MAMBA:
        return {m + mk: hf[p + hk] for hk, mk in _MAMBA_SAME.items() if p + hk in hf}
    if kind == _ATTN:
        x = p + "mixer."
        return {m + "input_layernorm.weight": hf[p + "norm.weight"],
                m + "self_attention.linear_qkv.weight": merge_qkv(hf[x + "q_proj.weight"], hf[x + "k_proj.weight"],
                                                                  hf[x + "v_proj.weight"], cfg),
                m + "self_attention.linear_proj.weight": hf[x + "o_proj.weight"]}
    if kind == _MLP:
        return {m + "pre_mlp_layernorm.weight": hf[p + "norm.weight"],
                m + "mlp.linear_fc1.weight": hf[p + "mixer.up_proj.weight"],
                m + "mlp.linear_fc2.weight": hf[p + "mixer.down_proj.weight"]}
    x = p + "mixer."
    out = {m + "pre_mlp_layernorm.weight": hf[p + "norm.weight"],
           m + "mlp.router.weight": hf[x + "gate.weight"],
           m + "mlp.router.expert_bias": hf[x + "gate.e_score_correction_bias"]}
    up, down = hf[x + "experts.up_proj"], hf[x + "experts.down_proj"]
    for e in range(up.shape[0]):
        out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = up[e]
        out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
    if x + "shared_experts.up_proj.weight" in hf:
        out[m + "mlp.shared_experts.linear_fc1.weight"] = hf[x + "shared_experts.up_proj.weight"]
        out[m + "mlp.shared_experts.linear_fc2.weight"] = hf[x + "shared_experts.down_proj.weight"]
    return out


def _nemotron_layer_to_hf(mc: dict, i: int, kind: str, cfg) -> dict:
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    if kind == _MAMBA:
        return {p + hk: mc[m + mk] for hk, mk in _MAMBA_SAME.items() if m + mk in mc}
    x = p + "mixer."
    if kind == _ATTN:
        q, k, v = split_qkv(mc[m + "self_attention.linear_qkv.weight"], cfg)
        return {p + "norm.weight": mc[m + "input_layernorm.weight"], x + "q_proj.weight": q, x + "k_proj.weight": k,
                x + "v_proj.weight": v, x + "o_proj.weight": mc[m + "self_attention.linear_proj.weight"]}
    if kind == _MLP:
        return {p + "norm.weight": mc[m + "pre_mlp_layernorm.weight"], x + "up_proj.weight": mc[m + "mlp.linear_fc1.weight"],
                x + "down_proj.weight": mc[m + "mlp.linear_fc2.weight"]}
    n = int(cfg.n_routed_experts)
    e_key = m + "mlp.experts.local_experts.{}.linear_fc{}.weight"
    out = {p + "norm.weight": mc[m + "pre_mlp_layernorm.weight"], x + "gate.weight": mc[m + "mlp.router.weight"],
           x + "gate.e_score_correction_bias": mc[m + "mlp.router.expert_bias"],
           x + "experts.up_proj": torch.stack([mc[e_key.format(e, 1)] for e in range(n)]),
           x + "experts.down_proj": torch.stack([mc[e_key.format(e, 2)] for e in range(n)])}
    if m + "mlp.shared_experts.linear_fc1.weight" in mc:
        out[x + "shared_experts.up_proj.weight"] = mc[m + "mlp.shared_experts.linear_fc1.weight"]
        out[x + "shared_experts.down_proj.weight"] = mc[m + "mlp.shared_experts.linear_fc2.weight"]
    return out


def _ends(cfg) -> tuple[str, str]:
    """HF names of the input embeddings and the final norm."""
    if model_type_of(cfg) == LLAMA:
        return "model.embed_tokens.weight", "model.norm.weight"
    return "model.embeddings.weight", "model.norm_f.weight"


def hf_to_megatron(hf: dict, cfg) -> dict:
    """A whole HF state dict -> the whole Megatron state dict (local-spec names, TP=1, EP=1)."""
    kind, (emb, final) = model_type_of(cfg), _ends(cfg)
    out = {"embedding.word_embeddings.weight": hf[emb],
           ("decoder.final_layernorm.weight" if kind == LLAMA else "decoder.final_norm.weight"): hf[final]}
    for i, sym in enumerate(hybrid_pattern(cfg)):
        out.update(_llama_layer_to_mc(hf, i, cfg) if kind == LLAMA else _nemotron_layer_to_mc(hf, i, sym, cfg))
    if not getattr(cfg, "tie_word_embeddings", False):
        out["output_layer.weight"] = hf["lm_head.weight"]
    return out


def megatron_to_hf(mc: dict, cfg) -> dict:
    """Inverse of :func:`hf_to_megatron` (bit-exact: only slicing, concatenation and renaming)."""
    kind, (emb, final) = model_type_of(cfg), _ends(cfg)
    out = {emb: mc["embedding.word_embeddings.weight"],
           final: mc["decoder.final_layernorm.weight" if kind == LLAMA else "decoder.final_norm.weight"]}
    for i, sym in enumerate(hybrid_pattern(cfg)):
        out.update(_llama_layer_to_hf(mc, i, cfg) if kind == LLAMA else _nemotron_layer_to_hf(mc, i, sym, cfg))
    out["lm_head.weight"] = mc["output_layer.weight"] if "output_layer.weight" in mc else out[emb]
    return out


#: local-spec name -> Transformer Engine spec name (the fused LayerNorm*Linear modules own the norm)
_TE_RENAMES = [
    (r"(decoder\.layers\.\d+\.)input_layernorm\.weight$", r"\1self_attention.linear_qkv.layer_norm_weight"),
    (r"(decoder\.layers\.\d+\.)norm\.weight$", r"\1mixer.in_proj.layer_norm_weight"),
    (r"(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.weight$", r"\1\3.weight\2"),
]


def to_te_names(mc: dict, fused_mlp_norm: bool) -> dict:
    """Local-spec names -> TE-spec names. ``fused_mlp_norm``: dense MLP layers use ``TELayerNormColumnParallel
    Linear`` (their ``pre_mlp_layernorm`` becomes ``mlp.linear_fc1.layer_norm_weight``); MoE layers keep it."""
    out = {}
    for key, value in mc.items():
        for pattern, repl in _TE_RENAMES:
            key = re.sub(pattern, repl, key)
        layer = re.match(r"(decoder\.layers\.\d+\.)pre_mlp_layernorm\.weight$", key)
        if fused_mlp_norm and layer and layer.group(1) + "mlp.linear_fc1.weight" in mc:
            key = layer.group(1) + "mlp.linear_fc1.layer_norm_weight"
        out[key] = value
    return out


def from_te_names(te: dict) -> dict:
    """Inverse of :func:`to_te_names`."""
    out = {}
    for key, value in te.items():
        key = re.sub(r"(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_weight$", r"\1input_layernorm.weight", key)
        key = re.sub(r"(decoder\.layers\.\d+\.)mixer\.in_proj\.layer_norm_weight$", r"\1norm.weight", key)
        key = re.sub(r"(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$", r"\1pre_mlp_layernorm.weight", key)
        key = re.sub(r"(decoder\.layers\.\d+\.mlp\.experts\.)(linear_fc[12])\.weight(\d+)$", r"\1local_experts.\3.\2.weight", key)
        out[key] = value
    return out
