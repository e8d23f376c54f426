"""Classifier-free guidance as the paper deploys it (eq. (3), section 4.5): paired rows in one batch.

Each conditional prompt (a TTS transcript or TTA caption inside its Figure 2 template) is paired with an
unconditional twin: the same template with the transcript/caption replaced by as many ``<pad>`` tokens as
the transcript has tokens (``tts_user_content(num_pads=...)`` of :mod:`audex.prompts`), which is how
the CFG training samples were made (section 4.3: untrainable padding in place of the condition). Both
rows sit in the *same* decoding batch (conditional rows first, their twins after them), so one forward
pass per step serves both; their next-token logits are combined with eq. (3)::

    logits' = cond + (lambda - 1) * (cond - uncond)

and the one token sampled from ``logits'`` is appended to both rows, which keeps the pair
token-synchronised. lambda = 1 gives ``cond`` exactly (``0 * finite == 0``).

The layout is the one of NeMo's MagpieTTS and transformers' MusicGen (``ClassifierFreeGuidanceLogitsProcessor``:
batch = [cond; uncond], ``uncond + lambda * (cond - uncond)``, algebraically the same formula). Neither is
reusable here: MusicGen's processor owns the split of one logits tensor, while the TensorRT-LLM logits
post-processor of the deployment gets the two rows separately; hence :func:`cfg_mix` on two tensors.

Example::

    >>> pair = CfgPairBatch(cond=[[1, 2, 3]], uncond=[[1, 0, 3]], guidance_scale=3.0)
    >>> pair.rows
    [[1, 2, 3], [1, 0, 3]]
    >>> logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]])      # rows: cond, uncond
    >>> pair.guide(logits)
    tensor([[4., 0.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def cfg_mix(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Eq. (3): ``cond + (guidance_scale - 1) * (cond - uncond)``, computed in float32.

    Inputs are the raw (finite) logits of the paired rows, same shape. Apply any token mask *after*
    mixing (:meth:`CodecConstraint.apply`): a ``-inf`` fed in here would become NaN or be revived
    (``cond = x``, ``uncond = -inf`` gives ``+inf`` for lambda > 1).
    """
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(
            f"cfg_mix needs cond and uncond logits of one shape, got {tuple(cond_logits.shape)} and "
            f"{tuple(uncond_logits.shape)}: every conditional row needs exactly one unconditional twin"
        )
    cond = cond_logits.float()
    return cond + (float(guidance_scale) - 1.0) * (cond - uncond_logits.float())


@dataclass
class CfgPairBatch:
    """Conditional prompts and their unconditional twins, decoded as one batch of ``2 * B`` rows.

    Args:
        cond: B conditional prompts (token ids).
        uncond: their B unconditional twins, in the same order.
        guidance_scale: lambda of eq. (3).
    """

    cond: list[list[int]]
    uncond: list[list[int]]
    guidance_scale: float

    def __post_init__(self):
        if len(self.cond) != len(self.uncond):
            raise ValueError(
                f"CFG pairs need one unconditional prompt per conditional prompt, got {len(self.cond)} and {len(self.uncond)}"
            )
        if not self.cond:
            raise ValueError("CfgPairBatch got no prompts")

    @property
    def num_pairs(self) -> int:
        return len(self.cond)

    @property
    def rows(self) -> list[list[int]]:
        """Batch rows: conditional prompts first, then their twins in the same order."""
        return [list(p) for p in self.cond] + [list(p) for p in self.uncond]

    def guide(self, row_logits: torch.Tensor) -> torch.Tensor:
        """``[2B, V]`` logits of :attr:`rows` -> ``[B, V]`` guided logits."""
        if row_logits.shape[0] != 2 * self.num_pairs:
            raise ValueError(f"expected logits for {2 * self.num_pairs} paired rows, got {row_logits.shape[0]}")
        return cfg_mix(row_logits[: self.num_pairs], row_logits[self.num_pairs :], self.guidance_scale)

    @staticmethod
    def to_both_rows(tokens: torch.Tensor) -> torch.Tensor:
        """The tokens sampled for the B pairs -> the ``2B`` row inputs of the next step."""
        return torch.cat([tokens, tokens], dim=0)

