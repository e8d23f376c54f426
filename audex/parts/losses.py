"""Training losses of section 4.3: token cross-entropy and the square-averaging loss of eq. (2).

* :func:`token_cross_entropy` -- per-token next-token losses; labels are ``-100`` on untrainable tokens (system
  and user turns, audio placeholders, padding, CFG padding), the shift happens inside.
* :func:`square_averaged_loss` -- eq. (2) over the units of a packed micro-batch::

      loss = sum_j sum(L_j) / sqrt(|L_j|)  /  sum_j sqrt(|L_j|)

  What a unit j is, is ``loss.square_average_unit``:

  - ``sample`` (default, the paper's text: "the j-th sample"): every sample of the micro-batch (row, sample id;
    ``sample_ids`` -1 = padding). A multi-turn chat is one unit however many assistant turns it has.
  - ``turn`` (the paper's cited source, Megatron-LM's multimodal ``scaled_loss_func`` in
    ``examples/multimodal/train.py``): every contiguous run of trainable targets in a row, i.e. every assistant
    turn (an untrainable stretch inside a turn splits it, as it does in Megatron, which infers turns from the
    loss mask alone). Runs never cross samples: the first target of a packed sample is never trainable.

  Either way the set {L_1..L_k} does not depend on how the samples were packed into rows: packing changes the
  speed, not the objective. The two units agree on single-turn samples (every task but multi-turn chats).
* MoE load balancing (the third term of the paper's objective) is :mod:`audex.parts.moe`.

Example::

    losses, trainable, sample_of_target = token_cross_entropy(logits, labels, sample_ids)
    loss = square_averaged_loss(losses, trainable, sample_of_target)               # per sample (the paper)
    loss = square_averaged_loss(losses, trainable, sample_of_target, unit="turn")  # per turn (Megatron)

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


SQUARE_AVERAGE_UNITS = ("sample", "turn")


def turn_ids(trainable: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]`` index of the contiguous run of trainable targets each position belongs to, per row (-1 where
    not trainable): Megatron's ``get_mask_start_and_end_idx`` as a tensor."""
    starts = trainable.clone()
    starts[:, 1:] &= ~trainable[:, :-1]
    return torch.where(trainable, torch.cumsum(starts.long(), dim=1) - 1, torch.full_like(starts, -1, dtype=torch.long))


def square_averaged_loss(losses: torch.Tensor, trainable: torch.Tensor, target_sample_ids: torch.Tensor,
                         unit: str = "sample") -> torch.Tensor:
    """Eq. (2) over every unit of the micro-batch: ``sum_j sum(L_j)/sqrt(|L_j|) / sum_j sqrt(|L_j|)``.

    ``unit`` is ``sample`` (each packed sample, the paper's text) or ``turn`` (each contiguous run of trainable
    targets, Megatron's ``scaled_loss_func``); see the module docstring. Each unit's mean loss is weighted by the
    square root of its trainable length: long units count more than in a per-unit mean, less than in a per-token
    mean. A micro-batch without trainable tokens gives a zero loss that still backpropagates (so that
    distributed ranks stay in step).
    """
    if unit == "turn":
        target_sample_ids = turn_ids(trainable)
    elif unit != "sample":
        raise ValueError(f"unknown square_average_unit {unit!r}; use one of {list(SQUARE_AVERAGE_UNITS)} "
                         "(model.loss.square_average_unit)")
    sums, counts = per_sample_sums(losses, trainable, target_sample_ids)
    if sums.numel() == 0:
        return losses.sum() * 0.0
    root = counts.sqrt()
    return (sums / root).sum() / root.sum()


REDUCTIONS = {"square_averaged": square_averaged_loss,
              "token_mean": lambda losses, trainable, _sids, unit="sample": mean_token_loss(losses, trainable)}


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None = None,
                        reduction: str = "square_averaged", unit: str = "sample"
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss with the configured reduction (``square_averaged``: eq. 2 over ``unit`` s, ``sample`` or
    ``turn``; ``token_mean``: eq. 1), plus detached statistics (``token_mean_loss``, ``token_accuracy``,
    ``trainable_tokens``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; use one of {sorted(REDUCTIONS)}")
    if unit not in SQUARE_AVERAGE_UNITS:
        raise ValueError(f"unknown square_average_unit {unit!r}; use one of {list(SQUARE_AVERAGE_UNITS)} "
                         "(model.loss.square_average_unit)")
    losses, trainable, target_samples = token_cross_entropy(logits, labels, sample_ids)
    loss = REDUCTIONS[reduction](losses, trainable, target_samples, unit=unit)
    with torch.no_grad():
        n = trainable.sum()
        correct = (logits[:, :-1].argmax(-1) == labels[:, 1:]) & trainable
        stats = {"token_mean_loss": (losses.sum() / n.clamp(min=1)).detach(),
                 "token_accuracy": correct.sum() / n.clamp(min=1),
                 "trainable_tokens": n}
    return loss, stats
