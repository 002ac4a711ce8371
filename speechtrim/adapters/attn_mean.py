"""``attn_mean``: self-attention over the audio tokens, then the mean of its output (paper's "Attn-Mean")."""

from __future__ import annotations

import torch
from torch import nn

from speechtrim.adapters.base import ADAPTERS, LengthAdapter, masked_mean


@ADAPTERS.register("attn_mean")
class AttnMeanAdapter(LengthAdapter):
    """Multi-head self-attention (padding keys masked), then the mean of the real outputs: one token.

    The query map starts at zero (uniform attention) and the value and output maps as identity, so the adapter
    starts as mean pooling and the projector before it gets a clean gradient from the first step; the key map is
    random, and the query learns from the first step.

    Args:
        dim: embedding width (also the attention width, as in the paper's Annex A).
        heads: attention heads (1 in the paper).
    """

    def __init__(self, dim: int, heads: int = 1) -> None:
        super().__init__(dim)
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"heads must be an int >= 1 that divides dim={dim}, got {heads!r}")
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        with torch.no_grad():  # zero queries (uniform attention), identity value and output: starts as the mean
            self.attention.in_proj_weight[:dim] = 0.0
            self.attention.in_proj_weight[2 * dim :] = torch.eye(dim)
            self.attention.out_proj.weight.copy_(torch.eye(dim))
            self.attention.in_proj_bias.zero_()
            self.attention.out_proj.bias.zero_()

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, _ = self.attention(x, x, x, key_padding_mask=~mask, need_weights=False)  # (B, T, D)
        return masked_mean(attended, mask), mask.new_ones(x.shape[0], 1)

    def output_length(self, num_frames: int) -> int:
        return 1
