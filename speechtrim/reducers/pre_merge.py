"""``pre_merge``: merge adjacent similar audio embeddings before the LLM (FastAdaSP's clustering, no attention)."""

from __future__ import annotations

from dataclasses import dataclass

from speechtrim.ops.merge import adjacent_similarity
from speechtrim.ops.plan import Plan
from speechtrim.reducers.base import REDUCERS
from speechtrim.reducers.pre_llm import PreLLMReducer, merge_per_span
from speechtrim.reduction import LayerStep


@REDUCERS.register("pre_merge")
@dataclass
class PreMerge(PreLLMReducer):
    """Score each adjacent pair of audio embeddings by cosine similarity (FastAdaSP eq. 4 on the embeddings instead
    of the keys), merge the most similar ``ratio`` of every span's tokens (chained into clusters) and replace each
    cluster by the plain mean of its members: there is no attention before the LLM to weight them by."""

    def plan(self, step: LayerStep) -> Plan:
        return merge_per_span(adjacent_similarity(step.hidden, step.span_id), step.span_id, step.ratio)
