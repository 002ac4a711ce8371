"""Shared plumbing of the training-free reducers: options, validation, the attach context and its statistics.

A reducer is a small dataclass that turns one layer's inputs (hidden states, audio spans, and where it needs them
attention received and key states) into a :class:`~speechtrim.ops.plan.Plan`. Everything model-specific lives in
:mod:`speechtrim.hf`; this module only decides how many tokens each layer removes.

Convention: ``layer=L`` means layer L is the first to run on the reduced sequence. Methods that read attention
(FastAdaSP, FastV, H2O) use the attention of layer L-1, the last layer that saw every token, so they need L >= 1.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from speechtrim.flops import flops_reduction as flops_saved
from speechtrim.flops import solve_ratio
from speechtrim.ops.plan import Plan
from speechtrim.ops.select import count_to_remove
from speechtrim.registry import Registry
from speechtrim.schedule import SCHEDULE_NAMES, layer_ratios

logger = logging.getLogger(__name__)

REDUCERS: Registry[Reducer] = Registry("reducer")


@dataclass
class LayerStep:
    """What a reducer sees at one reduction layer during prefill (tensors cover the whole padded batch).

    Args:
        layer: decoder layer index.
        hidden: (B, T, D) hidden states entering the layer (None for KV-cache evictors, which leave them alone).
        span_id: (B, T) long, audio span number per token, -1 for text and padding.
        num_remove: (B,) long, tokens to remove in each row at this layer.
        scores: (B, T) attention each token received in the layer before (summed over heads and queries), or None.
        keys: (B, H_kv, T, d) key states of the layer before, or None.
    """

    layer: int
    hidden: torch.Tensor | None
    span_id: torch.Tensor
    num_remove: torch.Tensor
    scores: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def audio(self) -> torch.Tensor:
        """(B, T) bool, the reducible tokens."""
        return self.span_id >= 0


@dataclass
class ReductionStats:
    """What a reducer did in the last prefill (batch row 0) and with which settings.

    ``tokens_per_layer`` is the prefill sequence length each decoder layer saw; ``requested_per_layer`` and
    ``removed_per_layer`` tell where a span was too short for the requested merges (``short_layers``).
    """

    method: str
    layer: int
    depth: int
    hidden_size: int
    intermediate_size: int
    ratios: list[float] = field(default_factory=list)
    requested_per_layer: list[int] = field(default_factory=list)
    short_layers: list[int] = field(default_factory=list)
    evicts_cache: bool = False
    _attach_stats: Any = None

    @property
    def tokens_per_layer(self) -> list[int]:
        """Prefill tokens each layer processed for batch row 0, its padding excluded."""
        return list(self._attach_stats.tokens_per_layer) if self._attach_stats is not None else []

    @property
    def tokens_per_row(self) -> list[list[int]]:
        """For every batch row, the prefill tokens each layer processed (padding excluded): (B, layers)."""
        per_layer = self._attach_stats.rows_tokens_per_layer if self._attach_stats is not None else []
        return [list(row) for row in zip(*per_layer)] if per_layer and all(per_layer) else []

    @property
    def removed_per_layer(self) -> list[int]:
        """Tokens removed from row 0 at each layer (for KV-cache evictors: cache columns evicted)."""
        if self._attach_stats is None:
            return []
        if self.evicts_cache:
            return list(self._attach_stats.cache_removed_per_layer)
        return list(self._attach_stats.removed_per_layer)

    @property
    def cache_tokens_per_layer(self) -> list[int]:
        """KV-cache columns each layer keeps for row 0 after prefill (differs from the prefill length for H2O)."""
        return list(self._attach_stats.cache_tokens_per_layer) if self._attach_stats is not None else []

    @property
    def flops_reduction(self) -> float:
        """Measured prefill-FLOPs reduction (FastAdaSP eq. 10 over the lengths really produced), batch row 0."""
        lengths = self.tokens_per_layer
        if not lengths:
            return 0.0
        base = [lengths[0]] * len(lengths)
        return flops_saved(base, lengths, self.hidden_size, self.intermediate_size)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the statistics."""
        return {"method": self.method, "layer": self.layer, "ratios": self.ratios,
                "tokens_per_layer": self.tokens_per_layer, "requested_per_layer": self.requested_per_layer,
                "removed_per_layer": self.removed_per_layer, "short_layers": self.short_layers,
                "cache_tokens_per_layer": self.cache_tokens_per_layer,
                "flops_reduction": self.flops_reduction}


@dataclass
class Reducer:
    """Options every reducer shares.

    Args:
        ratio: fraction of the current audio tokens removed at each reduction layer, in [0, 1).
        layer: first reduction layer (0-based), or "auto" for the layer chosen by transfer entropy
            (``speechtrim select-layer``).
        schedule: "none" (one layer: the sparse strategy), "constant" or "decay" (every layer from ``layer`` on: the
            dense strategies; decay falls linearly to 0 at the last layer), or a list of per-layer ratios.
        flops_reduction: instead of ``ratio``, a target fraction of prefill FLOPs to save; the ratio is solved per
            prompt from its text and audio token counts.
        seed: seed of the random baselines.
        positions: "original" (default): survivors keep their original position ids (FastV-style). "compact":
            from the first reduction layer on, each row's remaining tokens are re-numbered 0..n_l-1 and the rotary
            tables recomputed, as the FastAdaSP reference release does (not for M-RoPE models nor for ``h2o``).
    """

    ratio: float | None = None
    layer: int | str = 2
    schedule: str | float | Sequence[float] = "none"
    flops_reduction: float | None = None
    seed: int = 0
    positions: str = "original"

    name: ClassVar[str] = "reducer"
    needs_scores: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False
    evicts_cache: ClassVar[bool] = False  # True: plans shrink the KV cache after each layer's attention (H2O)

    def __post_init__(self) -> None:
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
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not 0.0 <= float(value) < 1.0):
                raise ValueError(f"{option} must be a number in [0, 1), got {value!r}")
        if self.layer != "auto" and (isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral)
                                     or self.layer < 0):
            raise ValueError(f"layer must be an int >= 0 or 'auto', got {self.layer!r}")
        if isinstance(self.schedule, str) and self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULE_NAMES} or per-layer ratios")
        if self.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' (keep the survivors' position ids) or 'compact' "
                             f"(re-number them 0..n-1), got {self.positions!r}")
        if self.flops_reduction is not None and not isinstance(self.schedule, str):
            raise ValueError("flops_reduction needs a named schedule ('none', 'constant', 'decay'), not a list")

    def plan(self, step: LayerStep) -> Plan:
        """The plan for one reduction layer; each method implements it."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, audio_spans: Any = None, audio_token_id: int | None = None) -> ReductionSession:
        """Attach to ``model``: ``with reducer(model) as stats: model.generate(...)``.

        Args:
            model: a Hugging Face causal LM or speech LLM (SDPA or eager attention, DynamicCache).
            audio_spans: one list of ``(start, end)`` per batch row; None finds them from the audio token id.
            audio_token_id: the audio placeholder id, when the model's config does not name one.
        """
        return ReductionSession(self, model, audio_spans, audio_token_id)


class ReductionSession:
    """The context in which a reducer is attached to one model; yields :class:`ReductionStats`."""

    def __init__(self, reducer: Reducer, model: nn.Module, audio_spans: Any, audio_token_id: int | None = None) -> None:
        from speechtrim.hf.attach import Attachment
        from speechtrim.hf.layers import text_backbone

        self.reducer = reducer
        backbone = text_backbone(model)
        layer = _resolve_layer(reducer.layer, model)
        if layer >= backbone.depth:
            raise ValueError(f"layer={layer} is beyond the model's depth: it has {backbone.depth} decoder layers, "
                             f"so use a layer in 0..{backbone.depth - 1}")
        if (reducer.needs_scores or reducer.needs_keys) and layer == 0 and not reducer.evicts_cache:
            raise ValueError(f"{reducer.name} reads the attention of the layer before the reduction layer, so "
                             "layer must be >= 1")
        probe = reducer.ratio if reducer.ratio else 0.5
        self.fixed_ratios = layer_ratios(reducer.schedule, probe, layer, backbone.depth)
        active = [index for index, value in enumerate(self.fixed_ratios) if value > 0]
        self.stats = ReductionStats(reducer.name, layer, backbone.depth, backbone.hidden_size,
                                    backbone.intermediate_size, evicts_cache=reducer.evicts_cache)
        self.layer = layer
        self._first_active = active[0] if active else None
        self._ratios: list[float] = []
        if reducer.evicts_cache:  # KV-cache eviction after each active layer's own attention; prefill untouched
            self.attachment = Attachment(model, cache_plan_fn=self._cache_plan_fn, cache_layers=active or [layer],
                                         audio_spans=audio_spans, audio_token_id=audio_token_id,
                                         positions=reducer.positions)
        else:
            wants_taps = reducer.needs_scores or reducer.needs_keys
            self.attachment = Attachment(model, self._plan_fn, score_layers=active if wants_taps else (),
                                         audio_spans=audio_spans, audio_token_id=audio_token_id,
                                         positions=reducer.positions)
        self.stats._attach_stats = self.attachment.stats

    def __enter__(self) -> ReductionStats:
        self.attachment.attach()
        return self.stats

    def __exit__(self, *exc_info: object) -> None:
        self.attachment.detach()

    def _cache_plan_fn(self, layer_idx: int, scores: torch.Tensor, span_id: torch.Tensor) -> Plan | None:
        if layer_idx == self._first_active or not self._ratios:
            self._start_prefill(span_id)
        return self._decide(layer_idx, None, span_id, scores)

    def _plan_fn(self, layer_idx: int, hidden: torch.Tensor, span_id: torch.Tensor,
                 scores: torch.Tensor | None) -> Plan | None:
        if layer_idx == 0 or not self._ratios:
            self._start_prefill(span_id)
        return self._decide(layer_idx, hidden, span_id, scores)

    def _decide(self, layer_idx: int, hidden: torch.Tensor | None, span_id: torch.Tensor,
                scores: torch.Tensor | None) -> Plan | None:
        layer_ratio = self._ratios[layer_idx]
        if layer_ratio <= 0:
            return None
        num_audio = (span_id >= 0).sum(dim=1)  # (B,)
        num_remove = count_to_remove(num_audio, layer_ratio).to(span_id.device)  # (B,)
        keys = self.attachment.layer_keys(layer_idx) if self.reducer.needs_keys else None
        if self.reducer.needs_scores and scores is None or self.reducer.needs_keys and keys is None:
            raise RuntimeError(f"{self.reducer.name}: no attention tap reached layer {layer_idx}; this is a bug")
        plan = self.reducer.plan(LayerStep(layer_idx, hidden, span_id, num_remove, scores, keys))
        self.stats.requested_per_layer[layer_idx] = int(num_remove[0])
        if bool((plan.removed < num_remove).any()):
            self.stats.short_layers.append(layer_idx)
            logger.info("layer %d: spans too short, removed %s of requested %s tokens", layer_idx,
                        plan.removed.tolist(), num_remove.tolist())
        return plan

    def _start_prefill(self, span_id: torch.Tensor) -> None:
        """Fix the per-layer ratios of this prefill (solving for a FLOPs target from row 0's token counts)."""
        reducer = self.reducer
        if not bool((span_id >= 0).any()):
            where = self.attachment.token_id
            raise ValueError(
                f"{reducer.name}: no audio tokens in this batch (looked for audio token id {where}); pass "
                "audio_spans=[[(start, end)], ...] or the right audio_token_id=, or run without the reducer"
            )
        if reducer.flops_reduction is None:
            self._ratios = layer_ratios(reducer.schedule, reducer.ratio, self.layer, self.stats.depth)
        else:
            state = getattr(self.attachment, "_state", None)
            padding = getattr(state, "padding", None)
            valid = int((~padding[0]).sum()) if padding is not None else span_id.shape[1]
            num_audio = int((span_id[0] >= 0).sum())
            ratio = 0.0 if num_audio == 0 else solve_ratio(
                float(reducer.flops_reduction), valid - num_audio, num_audio, str(reducer.schedule), self.layer,
                self.stats.depth, self.stats.hidden_size, self.stats.intermediate_size)
            self._ratios = layer_ratios(reducer.schedule, ratio, self.layer, self.stats.depth)
        self.stats.ratios = list(self._ratios)
        self.stats.requested_per_layer = [0] * self.stats.depth
        self.stats.short_layers = []


def _resolve_layer(layer: int | str, model: nn.Module) -> int:
    if layer != "auto":
        return int(layer)
    from speechtrim.layer_selection import selected_layer

    return selected_layer(model)


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
