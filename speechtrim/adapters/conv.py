"""``conv``: strided 1-D convolution over time (Zhang et al. 2023b; paper's "Conv")."""

from __future__ import annotations

import torch
from torch import nn

from speechtrim.adapters.base import ADAPTERS, LengthAdapter, lengths_mask


@ADAPTERS.register("conv")
class ConvAdapter(LengthAdapter):
    """Conv1d(dim -> dim, kernel_size, stride, padding=kernel_size // 2) over the frames; padding frames zeroed.

    Initialised as strided subsampling (identity on the centre tap), so the projector before it gets a clean
    gradient from the first step; training then moves it anywhere.

    Args:
        dim: embedding width.
        stride: time stride (2 halves the length, as in the paper).
        kernel_size: odd kernel width (default 3).
    """

    def __init__(self, dim: int, stride: int = 2, kernel_size: int = 3) -> None:
        super().__init__(dim)
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        self.stride = stride
        self.conv = nn.Conv1d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        with torch.no_grad():  # starts as strided subsampling: identity on the centre tap, zero elsewhere
            self.conv.weight.zero_()
            self.conv.weight[:, :, kernel_size // 2] = torch.eye(dim)
            self.conv.bias.zero_()

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x * mask.unsqueeze(-1).to(x.dtype)).transpose(1, 2)  # (B, D, T)
        y = self.conv(x).transpose(1, 2)  # (B, T_out, D)
        lengths = torch.div(mask.sum(dim=1) - 1, self.stride, rounding_mode="floor") + 1
        return y, lengths_mask(lengths, y.shape[1])

    def output_length(self, num_frames: int) -> int:
        return (num_frames - 1) // self.stride + 1
