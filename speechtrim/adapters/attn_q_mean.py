"""``attn_q_mean``: attention with one global query, the mean of the inputs (paper's "Attn-Q-Mean", equation 1).

Q = (1/L sum_i x_i) W_q, K = X W_k, V = X W_v, y = softmax(Q K^T / sqrt(d_k)) V W_o: one output token.
"""

from __future__ import annotations

import torch
from torch import nn

from speechtrim.adapters.base import ADAPTERS, LengthAdapter, masked_mean


@ADAPTERS.register("attn_q_mean")
class AttnQMeanAdapter(LengthAdapter):
    """Scaled dot-product attention whose single query is the projected mean of the real frames.

    The query map starts at zero (uniform attention) and, with ``hidden == dim``, the value and output maps as
    identity, so the adapter starts as mean pooling and the projector before it gets a clean gradient from the
    first step; the key map is random, and the query learns from the first step.

    Args:
        dim: embedding width.
        hidden: attention width d_k (default ``dim``, as in the paper's Annex A).
        heads: attention heads (1 in the paper).
    """

    def __init__(self, dim: int, hidden: int | None = None, heads: int = 1) -> None:
        super().__init__(dim)
        hidden = dim if hidden is None else hidden
        if not isinstance(heads, int) or heads < 1 or hidden % heads:
            raise ValueError(f"heads must be an int >= 1 that divides hidden={hidden}, got {heads!r}")
        self.heads = heads
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        with torch.no_grad():  # a zero query makes the attention uniform at first: the adapter starts as the mean
            self.query.weight.zero_()
            self.query.bias.zero_()
            if hidden == dim:  # and value and output maps that start as identity make it exactly the mean
                for linear in (self.value, self.out):
                    linear.weight.copy_(torch.eye(dim))
                    linear.bias.zero_()

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, frames, _ = x.shape
        q = self._split(self.query(masked_mean(x, mask)))  # (B, H, 1, d)
        k = self._split(self.key(x))  # (B, H, T, d)
        v = self._split(self.value(x))  # (B, H, T, d)
        keep = mask.view(batch, 1, 1, frames)  # (B, 1, 1, T)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, 1, d)
        y = y.transpose(1, 2).reshape(batch, 1, -1)  # (B, 1, hidden)
        return self.out(y), mask.new_ones(batch, 1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = t.shape
        return t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

    def output_length(self, num_frames: int) -> int:
        return 1
