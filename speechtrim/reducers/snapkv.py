"""``snapkv``: KV-cache eviction by what the end of the prompt looks at (Li et al., SnapKV, NeurIPS 2024), audio only.

SnapKV observes that the last queries of a prompt (the "observation window", here the instruction after the audio)
already attend to the positions the answer will need. Right after each reduction layer's prefill attention, every
audio key is scored by the attention it receives from the last ``window`` real queries of its row (summed over
heads and window queries), the scores are smoothed by average pooling over ``kernel`` neighbouring audio keys (so
that kept entries come in runs and keep their context, as the paper's pooling step does), and the lowest-scoring
audio entries are evicted from that layer's KV cache. Text, including the window itself, always stays.

Where this differs from the paper: SnapKV selects per attention head; speechtrim's caches keep one set of columns
per row, so the scores are summed over heads (as ``h2o`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speechtrim.ops.plan import Plan
from speechtrim.ops.select import evict_plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer


@REDUCERS.register("snapkv")
@dataclass
class SnapKV(Reducer):
    """Evict the audio KV entries the prompt's last queries attend to least, after pooling.

    Defaults to every layer (``layer=0``, ``schedule="constant"``), like ``h2o``: each layer evicts ``ratio`` of the
    audio entries by its own attention.

    Args:
        window: the last queries of each row whose attention counts (the observation window).
        kernel: odd width of the average pooling over neighbouring audio keys (1: no pooling).
    """

    window: int = 16
    kernel: int = 5

    acts_on: ClassVar[str] = "cache"
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})
    keyed_by: ClassVar[str] = "ratio"
    default_layer: ClassVar[int] = 0
    default_schedule: ClassVar[str] = "constant"
    stacks_layers: ClassVar[bool] = True  # each row's plan reads that row's scores alone

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1 (queries at the end of the prompt), got {self.window!r}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd int >= 1 (pooling width over audio keys), got {self.kernel!r}")

    def score_queries(self, valid: torch.Tensor | None, span_id: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the last ``window`` real tokens of each row."""
        real = valid if valid is not None else torch.ones_like(span_id, dtype=torch.bool)
        from_end = real.flip(1).long().cumsum(dim=1).flip(1)  # 1 at a row's last real token, 2 before it, ...
        return real & (from_end <= self.window)

    def plan(self, step: LayerStep) -> Plan:
        audio = step.audio  # (B, T)
        scores = step.scores * audio  # (B, T) window attention received, audio columns only
        if self.kernel > 1:  # mean over the audio keys of each kernel-wide neighbourhood
            ones = torch.ones(1, 1, self.kernel, device=scores.device)
            total = torch.nn.functional.conv1d(scores[:, None].float(), ones, padding=self.kernel // 2)[:, 0]
            count = torch.nn.functional.conv1d(audio[:, None].float(), ones, padding=self.kernel // 2)[:, 0]
            scores = total / count.clamp(min=1)  # (B, T)
        return evict_plan(scores, audio, step.num_remove)
