"""A test method for the attachment's plumbing: it runs a plain function at chosen layers.

``FnMethod(fn, layers={2}, needs={"scores"})`` calls ``fn(layer, hidden, span_id, scores)`` at layers 2 (hidden
states, before the layer) and, with ``acts_on="cache"``, ``fn(layer, scores, span_id)`` right after those layers'
attention (KV-cache eviction). ``layers=None`` means every layer. ``seen`` records each step.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from speechtrim.ops.select import count_to_remove
from speechtrim.reduction import LayerStep


@dataclass
class FnMethod:
    fn: Callable
    layers: Collection[int] | None = None
    needs: frozenset[str] = frozenset()
    acts_on: str = "hidden"
    positions: str = "original"
    name: str = "test-fn"
    steps: list[LayerStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.needs = frozenset(self.needs)

    def resolve_layer(self, model, depth: int) -> tuple[int, str]:
        chosen = sorted(self.layers) if self.layers is not None else [0]
        bad = [layer for layer in chosen if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"layers {bad} are outside the decoder's layers 0..{depth - 1}")
        return chosen[0], "given"

    def prefill_ratios(self, layer: int, shape, text_tokens: int, audio_tokens: int) -> list[float]:
        return [0.5 if self.layers is None or index in self.layers else 0.0 for index in range(shape.depth)]

    def removal_counts(self, span_id, ratio):
        return count_to_remove((span_id >= 0).sum(dim=1), ratio)

    def score_queries(self, valid, span_id):
        return valid

    def plan(self, step: LayerStep):
        self.steps.append(step)
        if self.acts_on == "cache":
            return self.fn(step.layer, step.scores, step.span_id)
        return self.fn(step.layer, step.hidden, step.span_id, step.scores)


def scored(fn: Callable, layers: Collection[int] | None = None, **options) -> FnMethod:
    """``fn`` at ``layers`` with the scores and keys of the layer before each."""
    return FnMethod(fn, layers, frozenset({"scores", "keys"}), **options)


def evictor(fn: Callable, layers: Collection[int], **options) -> FnMethod:
    """``fn(layer, scores, span_id)`` evicting from the KV cache of ``layers`` after their own attention."""
    return FnMethod(fn, layers, frozenset({"scores"}), acts_on="cache", **options)
