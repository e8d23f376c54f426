"""Training and validation steps of :class:`~audex.models.audex_model.AudexModel` (the model delegates here).

A batch is the data pipeline's packed batch (``audex.data``): ``input_ids``, ``labels`` (-100 = untrainable),
``position_ids`` (restart at every packed sample), ``sample_ids`` (-1 = padding) and ``audios`` (the clips whose
frames fill the ``<so_embedding>`` runs, in order). Attribute or key access both work.

The loss is ``model.loss.reduction`` (``square_averaged``: eq. 2 of the paper, the default, over the units of
``model.loss.square_average_unit``: ``sample`` as the paper writes it or ``turn`` as Megatron computes it;
``token_mean``: eq. 1) plus, for routed-expert backbones whose LLM trains, the load-balancing loss (coefficient 1e-6).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from audex.losses import language_model_loss
from audex.training.packed_attention import packed_segments, uses_varlen_attention


def batch_field(batch, name: str, default=None):
    """``batch.name`` or ``batch[name]``."""
    if isinstance(batch, dict):
        return batch.get(name, default)
    return getattr(batch, name, default)


def loss_reduction(model) -> str:
    loss_cfg = model.cfg.get("loss") if model.cfg is not None else None
    return str(loss_cfg.get("reduction", "square_averaged")) if loss_cfg is not None else "square_averaged"


def loss_unit(model) -> str:
    loss_cfg = model.cfg.get("loss") if model.cfg is not None else None
    return str(loss_cfg.get("square_average_unit", "sample")) if loss_cfg is not None else "sample"


def forward_batch(model, batch):
    """Run the model on a packed batch; returns the transformers output (logits over ``vocab.size``).

    With the backbone on ``audex_varlen_sdpa`` (:mod:`audex.training.packed_attention`), attention runs per
    packed sample (cost sum n_j^2); otherwise ``AudexModel.forward`` masks a dense ``[L, L]`` attention."""
    input_ids, position_ids = batch_field(batch, "input_ids"), batch_field(batch, "position_ids")
    sample_ids, audios = batch_field(batch, "sample_ids"), batch_field(batch, "audios") or None
    if sample_ids is not None and uses_varlen_attention(model):
        embeds = model.embed_inputs(input_ids, model.encode_audio(audios) if audios else None)
        return model.backbone(inputs_embeds=embeds, position_ids=position_ids,
                              audex_segments=packed_segments(sample_ids))
    return model(input_ids=input_ids, position_ids=position_ids, sample_ids=sample_ids, audios=audios)


def compute_loss(model, batch, reduction: str | None = None, with_moe: bool = True):
    """Loss of ``model`` on ``batch`` and detached statistics (``token_mean_loss``, ``token_accuracy``,
    ``trainable_tokens``, ``real_tokens``, and ``moe_aux_loss`` for MoE backbones)."""
    sample_ids = batch_field(batch, "sample_ids")
    input_ids = batch_field(batch, "input_ids")
    balancer = getattr(model, "_audex_moe_balancer", None) if with_moe else None
    valid = sample_ids >= 0 if sample_ids is not None else torch.ones_like(input_ids, dtype=torch.bool)
    recording = balancer.recording(valid) if balancer is not None else nullcontext()
    with recording:
        out = forward_batch(model, batch)
    loss, stats = language_model_loss(out.logits, batch_field(batch, "labels"), sample_ids,
                                      reduction=reduction or loss_reduction(model), unit=loss_unit(model))
    stats["real_tokens"] = valid.sum()
    if balancer is not None:
        aux = balancer.load_balancing_loss()
        if aux is not None:
            loss = loss + aux
            stats["moe_aux_loss"] = aux.detach()
    return loss, stats


def training_step(model, batch, batch_idx: int):
    loss, stats = compute_loss(model, batch)
    batch_size = int(batch_field(batch, "input_ids").shape[0])
    model.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch_size)
    model.log("train_token_accuracy", stats["token_accuracy"], batch_size=batch_size)
    model.log("train_real_tokens", stats["real_tokens"].float(), batch_size=batch_size, reduce_fx="sum")
    if "moe_aux_loss" in stats:
        model.log("train_moe_aux_loss", stats["moe_aux_loss"], batch_size=batch_size)
        balancer = model._audex_moe_balancer
        for key, value in balancer.last_update_stats.items():
            model.log(f"train_{key}", value, batch_size=batch_size)
    if model._trainer is not None and model.trainer.optimizers:
        model.log("lr", model.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=batch_size)
    return loss


def validation_step(model, batch, batch_idx: int, dataloader_idx: int = 0):
    with torch.no_grad():
        _, stats = compute_loss(model, batch, with_moe=False)
    n = int(stats["trainable_tokens"])
    # token-weighted means over the whole validation set (Lightning weights by batch_size)
    model.log("val_loss", stats["token_mean_loss"], prog_bar=True, batch_size=max(n, 1), add_dataloader_idx=False)
    model.log("val_token_accuracy", stats["token_accuracy"], batch_size=max(n, 1), add_dataloader_idx=False)
    return stats["token_mean_loss"]
