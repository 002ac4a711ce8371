"""``fastv``: evict the audio tokens that receive the least attention (Chen et al., FastV, 2024).

The scores are the attention each token received in the layer before the reduction layer, summed over heads and
over all queries; the lowest-scoring audio tokens are dropped from every later layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from speechtrim.ops.plan import Plan
from speechtrim.ops.select import evict_plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer


@REDUCERS.register("fastv")
@dataclass
class FastV(Reducer):
    """Drop the least-attended audio tokens."""

    needs: ClassVar[frozenset[str]] = frozenset({"scores"})

    def plan(self, step: LayerStep) -> Plan:
        return evict_plan(step.scores, step.audio, step.num_remove)
