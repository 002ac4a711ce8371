"""``none``: no length adaptation; every projected frame reaches the LLM (the paper's "None" row)."""

from __future__ import annotations

import torch

from speechtrim.adapters.base import ADAPTERS, LengthAdapter


@ADAPTERS.register("none")
class NoAdapter(LengthAdapter):
    """Identity: y = x, y_mask = mask."""

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, mask

    def output_length(self, num_frames: int) -> int:
        return num_frames
