"""What an attachment remembers from one prefill to the decode steps that follow it.

A :class:`PrefillState` is created by the decoder's pre-hook at the start of every prefill (from the audio spans
of the prompt and its 2-D padding mask) and read by every layer's hook until the next prefill: the current span
ids, the plan accumulated so far, the attention taps, and each reduced layer's cache layout (which of its cache
columns are real tokens), which decode steps need because the cache comes out ragged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from speechtrim.hf.attention import AttentionTap
from speechtrim.hf.spans import AudioSpans, span_ids_from_input_ids, span_ids_from_spans
from speechtrim.ops.plan import Plan

logger = logging.getLogger(__name__)


@dataclass
class PrefillState:
    """Per-forward state of one prefill and of the decode steps that follow it.

    Args:
        original_length: T0, the prompt length the decoder sees at layer 0.
        padding: (B, T0) bool from the 2-D attention mask, None = no padding.
        span_id: (B, T_l) long, span ids of the current layout (-1 = text, padding or filler).
        accumulated: the plan original (B, T0) -> current layout (B, T_l); None = nothing reduced yet.
        ratios: the method's ratio of every layer in this prefill for row 0 (> 0: the layer is active).
        row_ratios: a ratio of ``ratios`` -> every row's own ratio at the layers that have it, when the rows'
            token counts differ (a FLOPs target solved per prompt); empty: every row runs row 0's.
        taps: hidden-state step layer -> attention tap of the layer before it.
        cache_pending: active cache layer -> (its valid columns, its own attention tap or None), waiting for the
            layer's attention to run.
        layouts: layer -> (B, T_l) bool, the layer's cache columns that are valid.
        decode_mask: (B, T0 + generated) bool, 2-D mask of the current decode call; None when it has no padding.
        decode_width: columns of the current decode call's 2-D mask (None: no mask given).
        first_position: (B,) long, original position of each row's first real token (compact positions).
        compact: compact (B, T_l) position ids, cos, sin of the current layout (compact positions).
        removal: ratio -> (the span ids it was counted on, the (B,) tokens to remove, whether any row removes one):
            a layer whose span ids and ratio are those of an earlier layer (every layer of a cache evictor) reuses
            the count.
        stack_until: a cache evictor whose layers' steps are planned together: the last active layer, after whose
            attention every waiting layer is evicted at once; None = each layer right after its own attention.
        stacked: the layers waiting for that, in order: (layer, its valid columns, its attention tap or None).
        queries: (valid, span ids, the method's ``score_queries`` of them): reused while a layer's valid columns
            and span ids are the same objects (every layer of a cache evictor).
    """

    original_length: int
    padding: torch.Tensor | None
    span_id: torch.Tensor
    accumulated: Plan | None = None
    ratios: list[float] = field(default_factory=list)
    row_ratios: dict[float, list[float]] = field(default_factory=dict)
    taps: dict[int, AttentionTap] = field(default_factory=dict)
    cache_pending: dict[int, tuple[torch.Tensor | None, AttentionTap | None]] = field(default_factory=dict)
    layouts: dict[int, torch.Tensor] = field(default_factory=dict)
    decode_mask: torch.Tensor | None = None
    decode_width: int | None = None
    first_position: torch.Tensor | None = None
    compact: tuple[torch.Tensor, ...] | None = None
    removal: dict[float, tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=dict, repr=False)
    stack_until: int | None = None
    stacked: list[tuple[int, torch.Tensor | None, AttentionTap | None]] = field(default_factory=list, repr=False)
    queries: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = field(default=None, repr=False)
    _full: dict[int, tuple[torch.Tensor, bool]] = field(default_factory=dict, repr=False)

    def set_decode_mask(self, mask: torch.Tensor | None) -> None:
        """Record a decode call's 2-D mask (B, T0 + generated + q), once per call rather than once per layer."""
        self.decode_width = int(mask.shape[1]) if mask is not None else None
        valid = mask.bool() if mask is not None else None
        self.decode_mask = None if valid is None or bool(valid.all()) else valid

    def layout_is_full(self, layer_idx: int) -> bool:
        """Whether every prefill cache column of a layer with a layout is a real token (computed once per layout)."""
        layout = self.layouts[layer_idx]
        known = self._full.get(layer_idx)
        if known is None or known[0] is not layout:  # a new layout (eviction, beam reordering): look again
            known = (layout, bool(layout.all()))
            self._full[layer_idx] = known
        return known[1]

    def fill_layouts(self, depth: int) -> None:
        """Give every layer a cache layout once any cache is evicted: layer 0's no longer sizes the decode mask.

        Args:
            depth: number of decoder layers.
        """
        base = self.padding
        if base is None:
            base = torch.ones(
                self.span_id.shape[0], self.original_length, dtype=torch.bool, device=self.span_id.device
            )
        for layer_idx in range(depth):
            self.layouts.setdefault(layer_idx, base)  # (B, T0); layers with a hidden plan overwrite theirs

    def generated_columns(self, layer_idx: int, cached: int, batch: int, query_length: int) -> torch.Tensor | None:
        """(B, generated + q) bool validity of a reduced layer's cache columns after the prompt; None = all valid.

        Refuses a decode step that does not continue this prefill: another batch, a cropped cache, a 2-D mask
        that was not extended by one column per generated token.

        Args:
            layer_idx: a layer with a cache layout (reduced, or any layer once a cache was evicted).
            cached: tokens in the layer's cache before this step (T_l + generated).
            batch: B of this decode step.
            query_length: q, tokens decoded in this step.
        """
        prefix = self.layouts[layer_idx]  # (B, T_l) bool
        if prefix.shape[0] != batch:
            raise ValueError(
                f"the batch changed from {prefix.shape[0]} to {batch} rows after prefill; reducers support "
                "generate() with greedy, sampling and beam search, not batch re-selection."
            )
        generated = cached - prefix.shape[1]  # tokens decoded so far at this layer
        if generated < 0:
            raise ValueError(
                f"layer {layer_idx} holds {cached} cached tokens but its prefill kept {prefix.shape[1]}; the cache "
                "was cropped or reused across prompts: start a new cache for each prompt."
            )
        if self.decode_width is not None and self.decode_width != self.original_length + generated + query_length:
            raise ValueError(
                f"the attention mask has {self.decode_width} columns, expected "
                f"{self.original_length + generated + query_length} (prompt + generated); extend the 2-D mask "
                "by one column per generated token, as generate() does."
            )
        if self.decode_mask is None:
            return None
        return self.decode_mask[:, self.original_length :]  # (B, generated + q)


def prefill_span_ids(
    audio_spans: AudioSpans | torch.Tensor | None,
    token_id: int | None,
    input_ids: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
) -> torch.Tensor:
    """(B, T0) span ids for one prefill, from explicit spans or from the input ids the model got.

    Args:
        audio_spans: explicit spans (one list of ``(start, end)`` per row) or a (B or 1, T0) span_id tensor; None =
            find them from ``input_ids == token_id``.
        token_id: the audio token id, or None when the config has none.
        input_ids: (B, T0) input ids captured from the model's forward, or None.
        batch: B, the decoder input's batch size (beams and returned sequences included).
        length: T0, the decoder input's length.
        device: where the span ids go.
    """
    if isinstance(audio_spans, torch.Tensor):
        span_id = audio_spans.to(device=device, dtype=torch.long)
    elif audio_spans is not None:
        span_id = span_ids_from_spans(audio_spans, len(audio_spans), length, device)
    elif token_id is not None and input_ids is not None:
        if tuple(input_ids.shape) != (batch, length):
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} do not line up with the decoder input ({batch}, "
                f"{length}) (legacy audio-token expansion?); expand audio tokens in the processor or pass "
                "audio_spans= explicitly."
            )
        return span_ids_from_input_ids(input_ids.to(device), token_id)
    else:
        if token_id is not None:
            raise ValueError(
                f"no audio spans for this prefill: the model config's audio token id is {token_id}, but the call "
                "passed inputs_embeds without input_ids, so speechtrim cannot see where the audio tokens are; pass "
                "input_ids, or audio_spans= (one list of (start, end) per row) to the reducer."
            )
        raise ValueError(
            "no audio spans for this prefill: the model config has no audio token id and no input_ids were "
            "seen; pass audio_spans= (one list of (start, end) per row) or audio_token_id= to the reducer."
        )
    if span_id.shape[1] != length:
        raise ValueError(
            f"audio_spans cover {span_id.shape[1]} tokens but the prompt has {length}; give spans for the "
            "sequence the decoder sees."
        )
    if span_id.shape[0] != batch:
        if span_id.shape[0] == 0 or batch % span_id.shape[0]:
            raise ValueError(
                f"audio_spans have {span_id.shape[0]} rows but the batch has {batch}; give one row per prompt."
            )
        span_id = span_id.repeat_interleave(batch // span_id.shape[0], dim=0)  # beams / num_return_sequences
    return span_id
