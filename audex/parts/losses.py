"""Training losses of section 4.3: token cross-entropy and the square-averaging loss of eq. (2).

* :func:`token_cross_entropy` -- per-token next-token losses; labels are ``-100`` on untrainable tokens (system
  and user turns, audio placeholders, padding, CFG padding), the shift happens inside.
* :func:`square_averaged_loss` -- eq. (2) over the samples of a packed micro-batch::

      loss = sum_j sum(L_j) / sqrt(|L_j|)  /  sum_j sqrt(|L_j|)

  Samples are told apart by ``sample_ids`` (-1 = padding), as Megatron-LM's multimodal ``scaled_loss_func``
  (``examples/multimodal/train.py``) does with contiguous loss-mask runs. The set {L_1..L_k} is every sample of
  the micro-batch (row, sample id), so the loss of a set of samples does not depend on how they were packed
  into rows: packing changes the speed, not the objective. With one packed row per micro-batch (Megatron's
  setting) it is exactly Megatron's formula.
* MoE load balancing (the third term of the paper's objective) is :mod:`audex.parts.moe`.

Example::

    losses, trainable, sample_of_target = token_cross_entropy(logits, labels, sample_ids)
    loss = square_averaged_loss(losses, trainable, sample_of_target)

Hand-written because none of the libraries in use has it: transformers' ``ForCausalLMLoss`` averages over
all tokens of the batch (eq. 1, not eq. 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy per position.

    Args:
        logits: ``[B, L, V]`` (position t predicts token t+1).
        labels: ``[B, L]`` token ids, ``-100`` where the token is not trainable.
        sample_ids: ``[B, L]`` packed-sample index per position (-1 = padding); ``None`` means one sample per row.

    Returns:
        ``(losses [B, L-1] float32, trainable [B, L-1] bool, target_sample_ids [B, L-1])`` -- the loss of
        predicting token t+1, whether it counts, and the sample it belongs to. A target that starts a new
        sample is never trainable (no prediction across a sample boundary).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, L, V] and labels [B, L]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if sample_ids is None:
        sample_ids = torch.zeros_like(labels)
    elif sample_ids.shape != labels.shape:
        raise ValueError(f"sample_ids {tuple(sample_ids.shape)} must have the shape of labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    target_samples = sample_ids[:, 1:]
    trainable = (targets != IGNORE_INDEX) & (target_samples >= 0) & (sample_ids[:, :-1] == target_samples)
    if bool(((targets >= logits.shape[-1]) & trainable).any()):
        bad = int(targets[trainable].max())
        raise ValueError(f"label id {bad} is outside the model's vocabulary of {logits.shape[-1]} rows")
    safe_targets = torch.where(trainable, targets, torch.zeros_like(targets))
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), safe_targets.reshape(-1),
                             reduction="none").view_as(targets)
    return losses * trainable, trainable, target_samples


def mean_token_loss(losses: torch.Tensor, trainable: torch.Tensor) -> torch.Tensor:
    """Eq. (1): the mean over all trainable tokens of the micro-batch."""
    n = trainable.sum()
    if int(n) == 0:
        return losses.sum() * 0.0
    return (losses * trainable).sum() / n


def per_sample_sums(losses: torch.Tensor, trainable: torch.Tensor, target_sample_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss sums and trainable-token counts per (row, sample) of a micro-batch, samples without any
    trainable token dropped. Returns ``(sums [k], counts [k])``."""
    B = losses.shape[0]
    width = int(target_sample_ids.max().clamp(min=0)) + 1
    rows = torch.arange(B, device=losses.device).unsqueeze(1).expand_as(target_sample_ids)
    key = (rows * width + target_sample_ids.clamp(min=0))[trainable]
    sums = torch.zeros(B * width, dtype=losses.dtype, device=losses.device).index_add(0, key, losses[trainable])
    counts = torch.zeros(B * width, dtype=losses.dtype, device=losses.device).index_add(
        0, key, torch.ones_like(key, dtype=losses.dtype))
    present = counts > 0
    return sums[present], counts[present]


def square_averaged_loss(losses: torch.Tensor, trainable: torch.Tensor, target_sample_ids: torch.Tensor) -> torch.Tensor:
    """Eq. (2) over every sample of the micro-batch: ``sum_j sum(L_j)/sqrt(|L_j|) / sum_j sqrt(|L_j|)``.

    Each sample's mean loss is weighted by the square root of its trainable length: long samples count more
    than in a per-sample mean, less than in a per-token mean. A micro-batch without trainable tokens gives a
    zero loss that still backpropagates (so that distributed ranks stay in step).
    """
    sums, counts = per_sample_sums(losses, trainable, target_sample_ids)
    if sums.numel() == 0:
        return losses.sum() * 0.0
    root = counts.sqrt()
    return (sums / root).sum() / root.sum()


REDUCTIONS = {"square_averaged": square_averaged_loss,
              "token_mean": lambda losses, trainable, _sids: mean_token_loss(losses, trainable)}


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None = None,
                        reduction: str = "square_averaged") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss with the configured reduction (``square_averaged``: eq. 2; ``token_mean``: eq. 1),
    plus detached statistics (``token_mean_loss``, ``token_accuracy``, ``trainable_tokens``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; use one of {sorted(REDUCTIONS)}")
    losses, trainable, target_samples = token_cross_entropy(logits, labels, sample_ids)
    loss = REDUCTIONS[reduction](losses, trainable, target_samples)
    with torch.no_grad():
        n = trainable.sum()
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & trainable
        stats = {"token_mean_loss": (losses.sum() / n.clamp(min=1)).detach(),
                 "token_accuracy": correct.sum() / n.clamp(min=1),
                 "trainable_tokens": n}
    return loss, stats
