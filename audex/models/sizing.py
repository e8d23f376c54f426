"""Parameter accounting of an Audex config on the meta device (no weights allocated).

``count_parameters("conf/model/audex_30b_a3b.yaml")`` builds the encoder, adapter, backbone and codecs under
``torch.device("meta")`` and returns total and per-token *active* parameter counts (for MoE backbones, the
routed experts a token does not visit are subtracted).

Run ``python examples/audex_params.py`` (``audex-params``) for the table.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from audex.vocab import AudexVocab


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _inactive_expert_params(lm) -> int:
    """Routed-expert parameters a token does not use: (n_routed - k) / n_routed of every MoE layer's experts."""
    cfg = lm.config
    n_routed = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_local_experts", None)
    k = getattr(cfg, "num_experts_per_tok", None)
    if not n_routed or not k:
        return 0
    inactive = 0
    for module in lm.modules():
        if hasattr(module, "experts") and hasattr(module, "gate"):  # an MoE block: router + routed experts
            inactive += _numel(module.experts) * (n_routed - k) // n_routed
    return inactive


def build_on_meta(model_cfg) -> tuple:
    """``(vocab, encoder, adapter, backbone)`` of a model config (a YAML path or a DictConfig) on the meta
    device: shapes and parameter counts without allocating weights. Encoder and adapter are ``None`` when the
    config has no ``audio_encoder``."""
    cfg = OmegaConf.load(model_cfg) if isinstance(model_cfg, (str, Path)) else model_cfg
    vocab = AudexVocab(**OmegaConf.to_container(cfg.vocab, resolve=True))
    with torch.device("meta"):
        backbone = hydra.utils.instantiate(cfg.backbone, _convert_="all", vocab_size=vocab.size,
                                           text_vocab_size=vocab.text_vocab_size)
        encoder = hydra.utils.instantiate(cfg.audio_encoder, _convert_="all") if cfg.get("audio_encoder") else None
        adapter = (hydra.utils.instantiate(cfg.adapter, _convert_="all", input_size=encoder.hidden_size,
                                           output_size=backbone.hidden_size) if encoder is not None else None)
    return vocab, encoder, adapter, backbone


def count_parameters(model_yaml) -> dict:
    """Counts for a model YAML (or DictConfig), built on the meta device. Keys: vocab_size, encoder, adapter,
    backbone, backbone_embeddings, backbone_active, backbone_active_non_embedding, total_llm (adapter + backbone)."""
    vocab, encoder, adapter, backbone = build_on_meta(model_yaml)
    lm = backbone.lm
    emb = lm.get_input_embeddings().weight.numel()
    head = lm.get_output_embeddings()
    head_n = 0 if head is None or head.weight is lm.get_input_embeddings().weight else head.weight.numel()
    total_bb = _numel(backbone)
    active = total_bb - _inactive_expert_params(lm)
    text_rows = backbone.text_vocab_size
    dim = lm.config.hidden_size
    text_only_bb = total_bb - (vocab.size - text_rows) * dim * (1 if head_n == 0 else 2)
    return {
        "vocab_size": vocab.size,
        "encoder": _numel(encoder),
        "adapter": _numel(adapter),
        "backbone": total_bb,
        "backbone_text_vocab": text_only_bb,
        "backbone_embeddings": emb + head_n,
        "backbone_active": active,
        "backbone_active_non_embedding": active - emb - head_n,
        "total_llm": total_bb + _numel(adapter),
    }
