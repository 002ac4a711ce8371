"""``h2o``: heavy-hitter KV-cache eviction (Zhang et al., H2O, NeurIPS 2023), restricted to audio tokens.

Prefill runs on every token. Right after each reduction layer's attention, the audio tokens that received the least
attention in that layer (summed over heads and queries) are removed from the layer's KV cache: the cache tensors
really shrink, so decoding reads and stores less (FastAdaSP's public code only masked them). Text tokens, including
the prompt after the audio that plays H2O's "recent window" role, are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from speechtrim.ops.plan import Plan
from speechtrim.ops.select import evict_plan
from speechtrim.reducers.base import REDUCERS, LayerStep, Reducer


@REDUCERS.register("h2o")
@dataclass
class H2O(Reducer):
    """Evict the least-attended audio entries from the KV cache after prefill.

    Unlike the token reducers it defaults to every layer (``layer=0``, ``schedule="constant"``), as H2O keeps a
    budget in each layer's cache; each layer evicts ``ratio`` of the audio tokens by its own attention (summed over
    heads and every prompt query).
    """

    acts_on: ClassVar[str] = "cache"
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})
    keyed_by: ClassVar[str] = "ratio"  # a sweep column is its eviction ratio: the prefill FLOPs do not change
    default_layer: ClassVar[int] = 0
    default_schedule: ClassVar[str] = "constant"
    stacks_layers: ClassVar[bool] = True  # each row's plan reads that row's scores alone

    def plan(self, step: LayerStep) -> Plan:
        return evict_plan(step.scores, step.audio, step.num_remove)
