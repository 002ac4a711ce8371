"""``avg_merge``: FastAdaSP's clusters with uniform weights (the paper's "Average Merge" ablation, Table 7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speechtrim.ops.merge import adjacent_similarity, merge_plan
from speechtrim.ops.plan import Plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer


@REDUCERS.register("avg_merge")
@dataclass
class AvgMerge(Reducer):
    """Chain the most key-similar adjacent audio pairs into clusters and take their plain mean."""

    needs: ClassVar[frozenset[str]] = frozenset({"keys"})

    def plan(self, step: LayerStep) -> Plan:
        similarity = adjacent_similarity(step.keys, step.span_id)  # (B, T-1)
        return merge_plan(similarity, torch.ones_like(step.span_id, dtype=torch.float32), step.num_remove, chain=True)
