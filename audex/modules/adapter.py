"""The audio adapter: AF-Whisper features (1280) -> LLM embedding width."""

from __future__ import annotations

import torch
from torch import nn


class AudioAdapter(nn.Module):
    """The 2-layer MLP adapter of section 3.2: encoder width (1280) -> LLM width.

    Same shape as AF3's multi-modal projector (Linear, GELU, Linear); a plain module here because
    transformers' projector needs a whole AF3 config to build.
    """

    def __init__(self, input_size: int = 1280, output_size: int = 2048, hidden_size: int | None = None,
                 activation: str = "gelu"):
        super().__init__()
        hidden_size = hidden_size or output_size
        acts = {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}
        if activation not in acts:
            raise ValueError(f"unknown adapter activation {activation!r}; use one of {sorted(acts)}")
        self.linear_1 = nn.Linear(input_size, hidden_size)
        self.act = acts[activation]
        self.linear_2 = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))
