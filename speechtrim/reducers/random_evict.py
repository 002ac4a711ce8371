"""``random_evict``: drop randomly chosen audio tokens (FastAdaSP's Random Evict baseline), seeded."""

from __future__ import annotations

from dataclasses import dataclass

from speechtrim.ops.plan import Plan
from speechtrim.ops.select import evict_plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer, batch_invariant_random


@REDUCERS.register("random_evict")
@dataclass
class RandomEvict(Reducer):
    """Drop random audio tokens (``seed`` fixes the draw)."""

    def plan(self, step: LayerStep) -> Plan:
        return evict_plan(batch_invariant_random(step.span_id, self.seed, step.layer), step.audio, step.num_remove)
