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
        draws = batch_invariant_random(step.span_id, self.seed, step.layer)[:, :-1]  # (B, T-1)
        similarity = torch.where(same_span_pairs(step.span_id), draws, torch.full_like(draws, float("-inf")))
        return merge_plan(similarity, torch.ones_like(step.span_id, dtype=torch.float32), step.num_remove, chain=True)
