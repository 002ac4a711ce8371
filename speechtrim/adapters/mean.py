"""``mean``: mean pooling of the real frames (Bellver-Soler et al. 2025, "Mean"), to one token or per window."""

from __future__ import annotations

import math

import torch

from speechtrim.adapters.base import ADAPTERS, LengthAdapter, lengths_mask, masked_mean


@ADAPTERS.register("mean")
class MeanAdapter(LengthAdapter):
    """Average the real frames into one token, or with ``window=k`` average each run of k frames.

    Args:
        dim: embedding width.
        window: None (default) pools everything to one token; k >= 1 pools non-overlapping windows of k frames
            (a last, partial window averages only its real frames).
    """

    def __init__(self, dim: int, window: int | None = None) -> None:
        super().__init__(dim)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        self.window = window

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window is None:
            return masked_mean(x, mask), mask.new_ones(x.shape[0], 1)
        batch, frames, dim = x.shape
        windows = math.ceil(frames / self.window)
        pad = windows * self.window - frames
        weights = torch.nn.functional.pad(mask.to(x.dtype), (0, pad)).view(batch, windows, self.window, 1)
        grouped = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, windows, self.window, dim)
        counts = weights.sum(dim=2)  # (B, W, 1)
        y = (grouped * weights).sum(dim=2) / counts.clamp(min=1)  # (B, W, D)
        lengths = torch.div(mask.sum(dim=1) + self.window - 1, self.window, rounding_mode="floor")
        return y, lengths_mask(lengths, windows)

    def output_length(self, num_frames: int) -> int:
        return 1 if self.window is None else math.ceil(num_frames / self.window)
