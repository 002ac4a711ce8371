"""Shared base of the length adapters: the (x, mask) -> (y, y_mask) contract and input checks."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import torch
from torch import nn

from speechtrim.registry import Registry

ADAPTERS: Registry[LengthAdapter] = Registry("length adapter")


class LengthAdapter(nn.Module):
    """Shortens a padded batch of audio embeddings; ``mask`` is True on real frames.

    Subclasses implement ``_forward`` and ``output_length``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, T, dim) embeddings; mask (B, T) bool, True on real frames (default: all real).

        Returns: y (B, T_out, dim) and y_mask (B, T_out) bool.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (batch, frames, {self.dim}), got {tuple(x.shape)}")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every batch row needs at least one real frame (mask row is all False)")
        return self._forward(x, mask)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def output_length(self, num_frames: int) -> int:
        """Number of output tokens for ``num_frames`` real input frames."""
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every adapter's ``output_length`` refuses a frame count that is not an int >= 0."""
        super().__init_subclass__(**kwargs)
        inner = cls.__dict__.get("output_length")
        if inner is None:
            return

        @functools.wraps(inner)
        def checked(self: LengthAdapter, num_frames: int) -> int:
            if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 0:
                raise ValueError(f"output_length needs a frame count, an int >= 0, got {num_frames!r}")
            return inner(self, num_frames)

        cls.output_length = checked

    @property
    def num_trainable(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real frames: x (B, T, D), mask (B, T) -> (B, 1, D)."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)


def lengths_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_length) bool mask, True on the first ``lengths[b]`` positions."""
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
