"""What passes between a reduction method and the attachment that runs it: the per-layer step and the statistics.

A method (a :class:`speechtrim.reducers.Reducer`) declares what it is:

- ``acts_on``: "hidden" (it shrinks the hidden states entering a decoder layer at prefill, so every later layer
  runs on fewer tokens), "cache" (it evicts entries from a layer's KV cache right after that layer's prefill
  attention; the prefill itself is unchanged) or "embeddings" (it shrinks the audio embeddings before the LLM);
- ``needs``: what it reads besides the hidden states: "scores" (the attention each key received) and/or "keys"
  (the key states);
- ``keyed_by``: how a benchmark sweep keys its rows: "flops" (target prefill-FLOPs saved) or "ratio" (its own
  ratio, e.g. the share of audio KV entries a cache evictor drops);

and answers three calls from :class:`speechtrim.hf.attach.Attachment`: ``prefill_ratios`` (the pure per-prefill
plan: the ratio of every layer, from the prompt's token counts), ``score_queries`` (which queries count in the
scores) and ``plan`` (the :class:`~speechtrim.ops.plan.Plan` of one :class:`LayerStep`). The attachment builds the
whole step itself and records what happened in one :class:`ReductionStats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from speechtrim.flops import flops_reduction as flops_saved

ACTS_ON = ("hidden", "cache", "embeddings")
NEEDS = ("scores", "keys")
KEYED_BY = ("flops", "ratio")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a text decoder that a ratio plan depends on (FastAdaSP eq. 10)."""

    depth: int
    hidden_size: int
    intermediate_size: int


@dataclass
class LayerStep:
    """Everything a method sees at one layer of one prefill (tensors cover the whole padded batch).

    Args:
        layer: decoder layer index.
        hidden: (B, T, D) hidden states entering the layer; None for cache evictors, which leave them alone.
        span_id: (B, T) long, audio span number per token, -1 for text, padding and filler slots.
        num_remove: (B,) long, tokens to remove in each row at this layer.
        ratio: the layer's ratio in this prefill (``num_remove`` is this share of each row's audio tokens).
        valid: (B, T) bool, real tokens (False for left padding and filler slots); None = all real.
        scores: (B, T) float32, attention each token received, summed over heads and the queries
            ``score_queries`` chose: in the layer before (hidden-state methods) or in this layer (cache evictors).
        keys: (B, H_kv, T, d) key states after rotary embedding, of the same layer as ``scores``.
        audio_logits: (B, T, K+1) CTC logits of the model's vocabulary head aligned with the tokens (blank last),
            for pre-LLM methods on a model that has one (speechtrim's vocabulary projector); None otherwise.
    """

    layer: int
    hidden: torch.Tensor | None
    span_id: torch.Tensor
    num_remove: torch.Tensor
    ratio: float = 0.0
    valid: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    audio_logits: torch.Tensor | None = None

    @property
    def audio(self) -> torch.Tensor:
        """(B, T) bool, the reducible tokens."""
        return self.span_id >= 0


@dataclass
class ReductionStats:
    """What a method did in the last prefill, and with which settings (per-layer lists are for batch row 0).

    Args:
        method: the method's registered name.
        acts_on: "hidden", "cache" or "embeddings".
        layer: the first reduction layer as an integer (``layer="auto"`` resolved).
        layer_source: where it came from: "given", "default" or "auto: <selection file>".
        depth, hidden_size, intermediate_size: the text decoder's sizes.
        ratios: each layer's ratio in the last prefill.
        requested_per_layer: tokens (or cache entries) each layer was asked to remove.
        removed_per_layer: tokens removed at each layer (cache evictors: KV-cache entries evicted).
        short_layers: layers where a span was too short for the requested removals.
        tokens_per_layer: prefill tokens each layer processed, padding excluded.
        rows_tokens_per_layer: per layer, that count for every batch row.
        cache_tokens_per_layer: KV-cache entries each layer keeps after prefill.
        prefill_calls: prefill forward passes seen while attached.
        input_tokens: prompt tokens of the last prefill before any reduction, padding excluded (row 0).
    """

    method: str
    acts_on: str
    layer: int
    layer_source: str
    depth: int
    hidden_size: int
    intermediate_size: int
    ratios: list[float] = field(default_factory=list)
    requested_per_layer: list[int] = field(default_factory=list)
    removed_per_layer: list[int] = field(default_factory=list)
    short_layers: list[int] = field(default_factory=list)
    tokens_per_layer: list[int] = field(default_factory=list)
    rows_tokens_per_layer: list[list[int]] = field(default_factory=list)
    cache_tokens_per_layer: list[int] = field(default_factory=list)
    prefill_calls: int = 0
    input_tokens: int = 0

    def start_prefill(self, ratios: list[float], input_tokens: int = 0) -> None:
        """Reset the per-layer records for a new prefill that runs ``ratios`` on ``input_tokens`` prompt tokens."""
        depth = self.depth
        self.input_tokens = int(input_tokens)
        self.ratios = list(ratios)
        self.requested_per_layer = [0] * depth
        self.removed_per_layer = [0] * depth
        self.short_layers = []
        self.tokens_per_layer = [0] * depth
        self.rows_tokens_per_layer = [[] for _ in range(depth)]
        self.cache_tokens_per_layer = [0] * depth
        self.prefill_calls += 1

    @property
    def tokens_per_row(self) -> list[list[int]]:
        """For every batch row, the prefill tokens each layer processed (padding excluded): (B, layers)."""
        per_layer = self.rows_tokens_per_layer
        return [list(row) for row in zip(*per_layer)] if per_layer and all(per_layer) else []

    @property
    def flops_reduction(self) -> float:
        """Measured prefill-FLOPs reduction (FastAdaSP eq. 10 over the lengths really produced against the prompt's
        length at every layer), batch row 0."""
        lengths = self.tokens_per_layer
        if not lengths or not lengths[0]:
            return 0.0
        base = [self.input_tokens or lengths[0]] * len(lengths)
        return flops_saved(base, lengths, self.hidden_size, self.intermediate_size)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the statistics."""
        return {"method": self.method, "acts_on": self.acts_on, "layer": self.layer,
                "layer_source": self.layer_source, "ratios": self.ratios,
                "tokens_per_layer": self.tokens_per_layer, "requested_per_layer": self.requested_per_layer,
                "removed_per_layer": self.removed_per_layer, "short_layers": self.short_layers,
                "cache_tokens_per_layer": self.cache_tokens_per_layer, "flops_reduction": self.flops_reduction}


__all__ = ["ACTS_ON", "KEYED_BY", "NEEDS", "LayerStep", "ModelShape", "ReductionStats", "check_ratio"]
