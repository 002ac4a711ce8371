"""``fastadasp``: weighted adjacent token merge (Lu et al., FastAdaSP, EMNLP 2024 Industry, eqs. 4-6).

Adjacent audio tokens are compared by the cosine similarity of their key states (eq. 4); the k most similar pairs
are picked and consecutive picks chain into clusters; each cluster becomes the mean of its tokens weighted by the
attention each received, summed over heads and over every query, audio and text (eqs. 5-6).
``schedule="none"`` is the sparse strategy (one layer, e.g. chosen by transfer entropy with ``layer="auto"``);
``"constant"`` and ``"decay"`` are the dense strategies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from speechtrim.ops.merge import adjacent_similarity, merge_plan
from speechtrim.ops.plan import Plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer


@REDUCERS.register("fastadasp")
@dataclass
class FastAdaSP(Reducer):
    """Weighted merge of the most similar adjacent audio tokens; options as in :class:`Reducer`."""

    needs: ClassVar[frozenset[str]] = frozenset({"scores", "keys"})
    sweep_schedules: ClassVar[tuple[str, ...]] = ("none", "constant", "decay")  # sparse and both dense strategies

    def plan(self, step: LayerStep) -> Plan:
        similarity = adjacent_similarity(step.keys, step.span_id)  # (B, T-1), -inf across span borders
        weights = step.scores.clamp(min=0) * step.audio  # (B, T) attention received (eq. 5)
        return merge_plan(similarity, weights, step.num_remove, chain=True)
