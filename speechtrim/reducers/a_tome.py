"""``a_tome``: adjacent token merging (Li et al., Interspeech 2023): disjoint adjacent pairs, plain average.

Unlike FastAdaSP, picked pairs never chain: each merged token comes from exactly two neighbours (greedy by key
similarity, skipping pairs that touch a token already taken), and the merge is unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speechtrim.ops.merge import adjacent_similarity, merge_plan
from speechtrim.ops.plan import Plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer


@REDUCERS.register("a_tome")
@dataclass
class AToMe(Reducer):
    """Merge disjoint pairs of key-similar adjacent audio tokens by their mean."""

    needs: ClassVar[frozenset[str]] = frozenset({"keys"})

    def plan(self, step: LayerStep) -> Plan:
        similarity = adjacent_similarity(step.keys, step.span_id)  # (B, T-1)
        return merge_plan(similarity, torch.ones_like(step.span_id, dtype=torch.float32), step.num_remove, chain=False)
