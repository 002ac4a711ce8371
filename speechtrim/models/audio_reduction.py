"""A pre-LLM reducer on speechtrim's SpeechLM: ``with reducer(speechlm) as stats:`` shrinks the audio embeddings
between the projector (and length adapter) and the prompt splice, so the LLM runs unchanged on a shorter prompt.

While attached, :meth:`SpeechLM.prepare` reduces every clip's embeddings with
:func:`speechtrim.reducers.pre_llm.reduce_embeddings` (CTC logits included when the projector has a CTC head) and
records what it did in the :class:`~speechtrim.reduction.ReductionStats` the ``with`` yields.
"""

from __future__ import annotations

from typing import Any

import torch

from speechtrim.hf.layers import text_backbone
from speechtrim.reduction import ModelShape, ReductionStats
from speechtrim.reducers.pre_llm import ReducedEmbeddings, reduce_embeddings


def new_stats(reducer: Any, shape: ModelShape) -> ReductionStats:
    """Empty statistics of a pre-LLM method (its one reduction is before layer 0)."""
    return ReductionStats(reducer.name, "embeddings", 0, "default", shape.depth, shape.hidden_size,
                          shape.intermediate_size)


def record(stats: ReductionStats, reduced: ReducedEmbeddings, text_tokens: list[int], audio_tokens: list[int]) -> None:
    """Write one reduction into ``stats``: every layer runs on the shorter prompt (per-layer lists: row 0)."""
    depth = stats.depth
    stats.start_prefill([reduced.ratios[0]] + [0.0] * (depth - 1), input_tokens=text_tokens[0] + audio_tokens[0])
    kept = reduced.mask.sum(dim=1).tolist()
    rows = [text + count for text, count in zip(text_tokens, kept)]
    stats.requested_per_layer[0] = stats.removed_per_layer[0] = reduced.removed[0]
    stats.tokens_per_layer = [rows[0]] * depth
    stats.cache_tokens_per_layer = [rows[0]] * depth
    stats.rows_tokens_per_layer = [list(rows) for _ in range(depth)]


class AudioReduction:
    """Runs a pre-LLM method inside ``SpeechLM.prepare`` while the ``with`` block lasts.

    Args:
        speechlm: the SpeechLM.
        reducer: a :class:`~speechtrim.reducers.pre_llm.PreLLMReducer`.
    """

    def __init__(self, speechlm: Any, reducer: Any) -> None:
        if reducer.needs_ctc_head and not speechlm.has_ctc_head:
            raise ValueError(f"{reducer.name} reads the CTC head over the LLM's vocabulary, and this SpeechLM's "
                             "projector has none (projector='linear'); use the embedded model or another pre-LLM "
                             "method (pre_merge, samp, segment_topk)")
        self.speechlm = speechlm
        self.reducer = reducer
        self.shape = text_backbone(speechlm.llm).shape
        self.stats = new_stats(reducer, self.shape)

    def __enter__(self) -> ReductionStats:
        if getattr(self.speechlm, "audio_reduction", None) is not None:
            raise ValueError("a pre-LLM reducer is already attached to this SpeechLM; reducers do not stack: leave "
                             "the first one's `with` block before attaching another")
        self.speechlm.audio_reduction = self
        return self.stats

    def __exit__(self, *exc_info: object) -> None:
        self.speechlm.audio_reduction = None

    def reduce(self, embeds: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor | None,
               text_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduce right-padded audio embeddings (B, N, D) of prompts with ``text_tokens`` text tokens each."""
        aligned = logits if logits is not None and tuple(logits.shape[:2]) == tuple(embeds.shape[:2]) else None
        reduced = reduce_embeddings(self.reducer, embeds, mask, aligned, text_tokens, self.shape)
        record(self.stats, reduced, text_tokens, mask.sum(dim=1).tolist())
        return reduced.embeds, reduced.mask


__all__ = ["AudioReduction", "new_stats", "record"]
