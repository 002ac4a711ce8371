"""``random_merge``: merge randomly chosen adjacent audio pairs (FastAdaSP's Random Merge baseline), seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speechtrim.ops.merge import merge_plan, same_span_pairs
from speechtrim.ops.plan import Plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer, batch_invariant_random


@REDUCERS.register("random_merge")
@dataclass
class RandomMerge(Reducer):
    """Chain random adjacent pairs inside each audio span and average them (``seed`` fixes the draw)."""

    def plan(self, step: LayerStep) -> Plan:
        similarity = random_pair_scores(step.span_id, self.seed, step.layer)  # (B, T-1)
        return merge_plan(similarity, torch.ones_like(step.span_id, dtype=torch.float32), step.num_remove, chain=True)


def random_pair_scores(span_id: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """(B, T-1) seeded scores of adjacent pairs, -inf across span borders: the draw ``random_merge`` merges by.

    Args:
        span_id: (B, T) span ids.
        seed: the reducer's seed.
        layer: the layer (each layer draws anew).
    """
    draws = batch_invariant_random(span_id, seed, layer)[:, :-1]  # (B, T-1)
    return torch.where(same_span_pairs(span_id), draws, torch.full_like(draws, float("-inf")))
