"""``concat``: stack k adjacent frames and project back to the width (Fathullah et al. 2023; paper's "Concat")."""

from __future__ import annotations

import math

import torch
from torch import nn

from speechtrim.adapters.base import ADAPTERS, LengthAdapter, lengths_mask


@ADAPTERS.register("concat")
class ConcatAdapter(LengthAdapter):
    """Concatenate each run of ``factor`` frames (padding frames zeroed) and apply Linear(factor*dim -> dim).

    The linear map is initialised to average the stacked frames (so the projector before it gets a clean gradient
    from the first step); training then moves it anywhere.

    Args:
        dim: embedding width.
        factor: frames stacked into one token (2 halves the length, as in the paper).
    """

    def __init__(self, dim: int, factor: int = 2) -> None:
        super().__init__(dim)
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an int >= 1, got {factor!r}")
        self.factor = factor
        self.proj = nn.Linear(factor * dim, dim)
        with torch.no_grad():  # starts as the average of the stacked frames, so training starts from a pooling
            self.proj.weight.copy_(torch.eye(dim).repeat(1, factor) / factor)
            self.proj.bias.zero_()

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, frames, dim = x.shape
        tokens = math.ceil(frames / self.factor)
        pad = tokens * self.factor - frames
        x = torch.nn.functional.pad(x * mask.unsqueeze(-1).to(x.dtype), (0, 0, 0, pad))
        stacked = x.reshape(batch, tokens, self.factor * dim)  # (B, T/k, k*D)
        lengths = torch.div(mask.sum(dim=1) + self.factor - 1, self.factor, rounding_mode="floor")
        return self.proj(stacked), lengths_mask(lengths, tokens)

    def output_length(self, num_frames: int) -> int:
        return math.ceil(num_frames / self.factor)
