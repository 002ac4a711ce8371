"""The base of every reducer: its options, what it declares about itself, and its per-prefill ratio plan.

A reducer is a small dataclass. It declares what it acts on, what it needs and how a sweep keys it (see
:mod:`speechtrim.reduction`), and implements ``plan(step) -> Plan``. Calling it on a model returns the
:class:`~speechtrim.hf.attach.Attachment` that runs it: ``with reducer(model) as stats: model.generate(...)``.
The registry gives it its name. Everything model-specific lives in :mod:`speechtrim.hf`.

Convention: ``layer=L`` means layer L is the first to run on the reduced sequence. Hidden-state methods that read
attention (FastAdaSP, FastV) use the attention of layer L-1, the last layer that saw every token, so they need
L >= 1. Cache evictors (H2O, SnapKV) read the attention of the layer whose cache they shrink.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from speechtrim.flops import solve_ratio
from speechtrim.ops.plan import Plan
from speechtrim.ops.select import count_to_remove
from speechtrim.ratio import check_ratio
from speechtrim.reduction import ACTS_ON, KEYED_BY, NEEDS, LayerStep, ModelShape, ReductionStats
from speechtrim.registry import Registry
from speechtrim.schedule import SCHEDULE_NAMES, layer_ratios

REDUCERS: Registry[Reducer] = Registry("reducer")


@dataclass
class Reducer:
    """Options every reducer shares.

    Args:
        ratio: fraction of the current audio tokens removed at each reduction layer, in [0, 1).
        layer: first reduction layer (0-based), "auto" for the layer chosen by transfer entropy
            (``speechtrim select-layer``), or None for the method's ``default_layer``.
        schedule: "none" (one layer: the sparse strategy), "constant" or "decay" (every layer from ``layer`` on: the
            dense strategies; decay falls linearly to 0 at the last layer), or a list of per-layer ratios.
            None: the method's ``default_schedule``.
        flops_reduction: instead of ``ratio``, a target fraction of prefill FLOPs to save; the ratio is solved per
            prompt from its text and audio token counts.
        seed: seed of the random baselines.
        positions: "original" (default): survivors keep their original position ids (FastV-style). "compact":
            from the first reduction layer on, each row's remaining tokens are re-numbered 0..n_l-1 and the rotary
            tables recomputed, as the FastAdaSP reference release does (not for M-RoPE models nor for cache
            evictors).

    Class attributes a method declares:
        acts_on: "hidden", "cache" or "embeddings" (:mod:`speechtrim.reduction`).
        needs: subset of {"scores", "keys"}.
        keyed_by: "flops" or "ratio": what a benchmark column means for this method.
        default_layer, default_schedule: what ``layer=None`` / ``schedule=None`` mean.
        sweep_schedules: the schedules a default benchmark sweep runs (FastAdaSP: its sparse and dense strategies).
        stacks_layers: a cache evictor whose plan of a row depends on that row's step alone (not on ``step.layer``
            nor on other rows): on a short prompt the attachment then stacks every layer's step as rows of one step
            and plans them with one call (``speechtrim.hf.attach.STACKED_EVICTION_BYTES``).
    """

    ratio: float | None = None
    layer: int | str | None = None
    schedule: str | float | Sequence[float] | None = None
    flops_reduction: float | None = None
    seed: int = 0
    positions: str = "original"

    name: ClassVar[str] = "reducer"  # set by the registry
    acts_on: ClassVar[str] = "hidden"
    needs: ClassVar[frozenset[str]] = frozenset()
    keyed_by: ClassVar[str] = "flops"
    default_layer: ClassVar[int] = 2
    default_schedule: ClassVar[str] = "none"
    sweep_schedules: ClassVar[tuple[str, ...] | None] = None  # None: (default_schedule,)
    stacks_layers: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.acts_on not in ACTS_ON or cls.keyed_by not in KEYED_BY or not set(cls.needs) <= set(NEEDS):
            raise TypeError(f"{cls.__qualname__}: acts_on must be one of {ACTS_ON}, keyed_by one of {KEYED_BY}, "
                            f"needs a subset of {NEEDS}; got {cls.acts_on!r}, {cls.keyed_by!r}, {set(cls.needs)}")

    def __post_init__(self) -> None:
        if self.schedule is None:
            self.schedule = self.default_schedule
        if not isinstance(self.schedule, str) and self.ratio not in (None, 0, 0.0):
            raise ValueError(f"schedule={self.schedule!r} already sets the ratios and would override ratio="
                             f"{self.ratio}; pass ratio= with a named schedule ('none', 'constant', 'decay'), or "
                             "the per-layer ratios as schedule= with ratio=0")
        if (self.ratio is None) == (self.flops_reduction is None):
            raise ValueError(
                "pass exactly one of ratio= (fraction of audio tokens removed per reduction layer, e.g. 0.3) or "
                "flops_reduction= (target fraction of prefill FLOPs saved, e.g. 0.3)"
            )
        for option in ("ratio", "flops_reduction"):
            if getattr(self, option) is not None:
                check_ratio(getattr(self, option), option)
        if self.layer not in (None, "auto") and (isinstance(self.layer, bool)
                                                 or not isinstance(self.layer, numbers.Integral) or self.layer < 0):
            raise ValueError(f"layer must be an int >= 0, 'auto' or None (the method's default), got {self.layer!r}")
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULE_NAMES} or per-layer ratios")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' (keep the survivors' position ids) or 'compact' "
                             f"(re-number them 0..n-1), got {self.positions!r}")
        if self.flops_reduction is not None and not isinstance(self.schedule, str):
            raise ValueError("flops_reduction needs a named schedule ('none', 'constant', 'decay'), not a list")

    # ------------------------------------------------------------------ what the attachment calls
    def resolve_layer(self, model: nn.Module, depth: int) -> tuple[int, str]:
        """The first reduction layer as an integer and where it came from ("given", "default", "auto: <file>").

        Refuses a layer beyond the model's depth, and layer 0 for a hidden-state method that reads attention.

        Args:
            model: the model the reducer is attached to (``layer="auto"`` reads its stored selection).
            depth: its text decoder's number of layers.
        """
        if self.layer == "auto":
            from speechtrim.layer_store import stored_selection

            layer, path = stored_selection(model)
            source = f"auto: {path}"
        elif self.layer is None:
            layer, source = self.default_layer, "default"
        else:
            layer, source = int(self.layer), "given"
        if layer >= depth:
            raise ValueError(f"layer={layer} is beyond the model's depth: it has {depth} decoder layers, "
                             f"so use a layer in 0..{depth - 1}")
        if self.needs and self.acts_on == "hidden" and layer == 0:
            raise ValueError(f"{self.name} reads the attention of the layer before the reduction layer, so "
                             "layer must be >= 1")
        return layer, source

    def prefill_ratios(self, layer: int, shape: ModelShape, text_tokens: int, audio_tokens: int) -> list[float]:
        """The ratio of every decoder layer for one prompt: the schedule at ``ratio``, or at the ratio that saves
        ``flops_reduction`` of the prefill FLOPs of a prompt with these token counts (FastAdaSP eq. 10).

        Args:
            layer: the resolved first reduction layer.
            shape: the text decoder's sizes.
            text_tokens: the prompt's text tokens (padding excluded).
            audio_tokens: its audio tokens.
        """
        if self.flops_reduction is None:
            return layer_ratios(self.schedule, self.ratio, layer, shape.depth)
        ratio = 0.0 if audio_tokens == 0 else solve_ratio(
            float(self.flops_reduction), text_tokens, audio_tokens, str(self.schedule), layer, shape.depth,
            shape.hidden_size, shape.intermediate_size)
        return layer_ratios(self.schedule, ratio, layer, shape.depth)

    def removal_counts(self, span_id: torch.Tensor, ratio: float) -> torch.Tensor:
        """(B,) tokens a layer at ``ratio`` removes from each row: ``ratio`` of the row's audio tokens (rounded
        half down, at least one kept; :func:`speechtrim.ops.select.count_to_remove`).

        Args:
            span_id: (B, T) span ids of the layer (-1: not audio).
            ratio: the layer's ratio.
        """
        return count_to_remove((span_id >= 0).sum(dim=1), ratio).to(span_id.device)

    def score_queries(self, valid: torch.Tensor | None, span_id: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool, the queries whose attention counts in ``LayerStep.scores``: every real token by default.

        Args:
            valid: (B, T) bool, real tokens of the layer (None = all).
            span_id: (B, T) span ids of the layer.
        """
        return valid

    def plan(self, step: LayerStep) -> Plan:
        """The plan for one reduction layer; each method implements it."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, audio_spans: Any = None, audio_token_id: int | None = None) -> Any:
        """Attach to ``model``: ``with reducer(model) as stats: model.generate(...)``.

        A pre-LLM method (``acts_on == "embeddings"``) on speechtrim's SpeechLM reduces the audio embeddings in
        ``SpeechLM.prepare`` (:class:`speechtrim.models.audio_reduction.AudioReduction`); on a Hugging Face model
        it reduces the decoder's input embeddings before layer 0.

        Args:
            model: a Hugging Face causal LM or speech LLM (SDPA or eager attention, DynamicCache), or a SpeechLM.
            audio_spans: one list of ``(start, end)`` per batch row; None finds them from the audio token id.
            audio_token_id: the audio placeholder id, when the model's config does not name one.
        """
        if self.acts_on == "embeddings":
            from speechtrim.models.speechlm import SpeechLM

            if isinstance(model, SpeechLM):
                from speechtrim.models.audio_reduction import AudioReduction

                if audio_spans is not None or audio_token_id is not None:
                    raise ValueError("a SpeechLM knows where its audio is: attach a pre-LLM reducer to it without "
                                     "audio_spans or audio_token_id")
                return AudioReduction(model, self)
        from speechtrim.hf.attach import Attachment

        return Attachment(model, self, audio_spans, audio_token_id)


def relative_positions(span_id: torch.Tensor) -> torch.Tensor:
    """(B, T) index of each audio token among its row's audio tokens (-1 elsewhere); independent of padding."""
    audio = span_id >= 0
    return torch.where(audio, audio.long().cumsum(dim=1) - 1, torch.full_like(span_id, -1))


def batch_invariant_random(span_id: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """(B, T) seeded uniform scores that depend only on a token's place among its row's audio tokens.

    A row gets the same draws whether it runs alone or inside a padded batch, so random baselines keep the
    padded-row == solo-row guarantee.
    """
    positions = relative_positions(span_id)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer))
    table = torch.rand(int(positions.max()) + 2, generator=generator).to(span_id.device)  # (max_audio + 1,)
    return table[positions.clamp(min=0)]


__all__ = ["REDUCERS", "LayerStep", "Reducer", "ReductionStats", "batch_invariant_random", "relative_positions"]
