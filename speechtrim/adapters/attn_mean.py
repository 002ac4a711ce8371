"""``attn_mean``: self-attention over the audio tokens, then the mean of its output (paper's "Attn-Mean")."""

from __future__ import annotations

import torch
from torch import nn

from speechtrim.adapters.base import ADAPTERS, LengthAdapter, masked_mean


@ADAPTERS.register("attn_mean")
class AttnMeanAdapter(LengthAdapter):
    """Multi-head self-attention (padding keys masked), then the mean of the real outputs: one token.

    Args:
        dim: embedding width (also the attention width, as in the paper's Annex A).
        heads: attention heads (1 in the paper).
    """

    def __init__(self, dim: int, heads: int = 1) -> None:
        super().__init__(dim)
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"heads must be an int >= 1 that divides dim={dim}, got {heads!r}")
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, _ = self.attention(x, x, x, key_padding_mask=~mask, need_weights=False)  # (B, T, D)
        return masked_mean(attended, mask), mask.new_ones(x.shape[0], 1)

    def output_length(self, num_frames: int) -> int:
        return 1
