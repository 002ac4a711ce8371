"""Attach a training-free token reducer to any Hugging Face decoder with removable hooks (no forks, no patches).

transformers 5.23's decoder loop computes ``position_embeddings`` (cos, sin), ``position_ids`` and the causal mask
once, at full length, and hands the same objects to every layer. An :class:`Attachment` registers a forward
pre-hook (``with_kwargs=True``) on every decoder layer. During prefill a layer's hook asks ``plan_fn`` for a
:class:`~speechtrim.ops.plan.Plan`, shrinks ``hidden_states`` with it, and - at that layer and every later one -
re-indexes the full-length position ids, rotary tables (:mod:`.positions`) and mask (:mod:`.masks`) with the plan
accumulated so far. The KV cache comes out ragged (e.g. ``[40, 40, 25, 25]``); at decode time each reduced layer's
mask is rebuilt for its own cache layout, which is what lets left-padded ``generate()`` work. Everything is undone
in ``detach`` (``finally``). What a prefill leaves for its decode steps lives in :mod:`.state`; what the attachment
refuses, in :mod:`.checks`.

KV-cache evictors (H2O) pass ``cache_plan_fn`` and ``cache_layers`` instead of (or besides) ``plan_fn``: right
after a cache layer's attention has run over the prefill, a forward hook on its attention module applies the plan
built from that layer's own attention scores to ``cache.layers[i].keys / .values`` (see :mod:`.kv_evict`).

Positions: survivors keep their original position ids by default; ``positions="compact"`` re-numbers them as the
FastAdaSP reference release does (see :mod:`.positions`).

Usage::

    with Attachment(model, plan_fn, score_layers={3}) as attachment:
        model.generate(**inputs)
    attachment.stats.tokens_per_layer   # e.g. [40, 40, 40, 25, ...]

    with Attachment(model, cache_plan_fn=h2o_plan, cache_layers=range(2, depth)) as attachment:
        model.generate(**inputs)
    attachment.stats.cache_tokens_per_layer   # e.g. [40, 40, 28, 28, ...]

    with Attachment(model, plan_fn, positions="compact"):   # survivors renumbered 0..n_l-1
        model.generate(**inputs)
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from speechtrim.hf.attention import BACKEND_NAME, TAP_KWARG, AttentionTap, register_backend
from speechtrim.hf.checks import (  # SUPPORTED_ATTENTION, TESTED_FAMILIES, POSITION_MODES: still importable from here
    SUPPORTED_ATTENTION,  # noqa: F401
    TESTED_FAMILIES,  # noqa: F401
    check_arguments,
    check_decoder_inputs,
    check_plan,
    check_text_decoder,
    layer_set,
    warn_untested_family,
)
from speechtrim.hf.kv_evict import CachePlanFn, evict_after_prefill
from speechtrim.hf.layers import TextBackbone, cache_argument, set_text_attn_implementation, text_backbone
from speechtrim.hf.masks import decode_mask, prefill_mask
from speechtrim.hf.positions import (
    POSITION_MODES,  # noqa: F401
    compact_decode_positions,
    compact_prefill_positions,
    compact_rotary,
    first_position,
    gather_positions,
)
from speechtrim.hf.spans import AudioSpans, audio_token_id
from speechtrim.hf.state import PrefillState, prefill_span_ids
from speechtrim.ops.plan import Plan, apply_plan, compose_plans

logger = logging.getLogger(__name__)

# decoders that have a reducer attached right now (reducers do not stack); weak, so models are never kept alive
_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

PlanFn = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], "Plan | None"]


@dataclass
class AttachStats:
    """What the last prefill did, layer by layer.

    Args:
        tokens_per_layer: prefill tokens each decoder layer processed in batch row 0 (padding and filler slots
            excluded: the row's own tokens).
        rows_tokens_per_layer: per layer, the same count for every batch row.
        removed_per_layer: tokens removed from batch row 0 by the plan taken at each layer (0 where none).
        prefill_calls: prefill forward passes seen while attached.
        cache_tokens_per_layer: valid KV-cache columns each layer holds after prefill in batch row 0 (padding and
            filler slots excluded), after any cache eviction.
        cache_removed_per_layer: cache columns evicted (or merged away) from batch row 0 at each layer after its
            prefill attention (0 where none).
    """

    tokens_per_layer: list[int] = field(default_factory=list)
    rows_tokens_per_layer: list[list[int]] = field(default_factory=list)
    removed_per_layer: list[int] = field(default_factory=list)
    prefill_calls: int = 0
    cache_tokens_per_layer: list[int] = field(default_factory=list)
    cache_removed_per_layer: list[int] = field(default_factory=list)


class Attachment:
    """Reversible hooks that let ``plan_fn`` shrink the audio tokens of a Hugging Face decoder during prefill.

    Args:
        model: a Hugging Face causal LM or composite speech LLM (DynamicCache only; "sdpa" or "eager" attention).
        plan_fn: ``plan_fn(layer_idx, hidden (B, T, D), span_id (B, T), attn_scores (B, T) or None) -> Plan | None``,
            called at every decoder layer during prefill before its attention; a returned None keeps the tokens as
            they are. None (the argument) = no hidden-state reduction (a pure KV-cache evictor).
        score_layers: layers whose decision needs attention scores. The decision at layer i gets the attention each
            key received in layer i - 1 (summed over heads and valid queries, FastAdaSP eq. 5); layer 0 gets None.
            Non-empty switches the text decoder to the ``speechtrim_sdpa`` backend while attached.
        audio_spans: explicit audio spans, one list of ``(start, end)`` per batch row, or a (B, T) ``span_id``
            tensor; None finds them from ``input_ids == audio token id``.
        audio_token_id: overrides the audio token id read from the model config.
        cache_plan_fn: ``cache_plan_fn(layer_idx, scores (B, T), span_id (B, T)) -> Plan | None``, called during
            prefill for every layer of ``cache_layers`` right after that layer's attention, with the attention each
            of its keys received in THAT layer (summed over heads and valid queries); the plan is applied to the
            layer's ``cache.layers[i].keys / .values``, which really shrink (B, H_kv, T_kept, d). Hidden states and
            the other layers are untouched. Text, padding and filler columns must be kept (``span_id == -1``).
        cache_layers: the layers whose KV cache ``cache_plan_fn`` may reduce (their scores are tapped). Required
            with ``cache_plan_fn``; switches the text decoder to the ``speechtrim_sdpa`` backend while attached.
        positions: "original" (default): survivors keep their original position ids and rotary tables. "compact":
            from the first reduced layer on, each row's real tokens are re-numbered ``p0 + 0..n_l-1`` (``p0`` = the
            row's first real position, 0 under ``generate()``) and cos/sin are recomputed with the text decoder's
            ``rotary_emb``; decode steps continue each layer's numbering. Not for 3-D M-RoPE models (Qwen2.5-Omni)
            nor with ``cache_plan_fn`` (KV-cache evictors keep their cached rotary keys as they are).
    """

    def __init__(
        self,
        model: nn.Module,
        plan_fn: PlanFn | None = None,
        score_layers: Collection[int] = (),
        audio_spans: AudioSpans | torch.Tensor | None = None,
        audio_token_id: int | None = None,
        cache_plan_fn: CachePlanFn | None = None,
        cache_layers: Collection[int] = (),
        positions: str = "original",
    ) -> None:
        self.model = model
        self.plan_fn = plan_fn
        self.cache_plan_fn = cache_plan_fn
        self.backbone: TextBackbone = text_backbone(model)
        self.score_layers = layer_set(score_layers, "score_layers", self.backbone.depth)
        self.cache_layers = layer_set(cache_layers, "cache_layers", self.backbone.depth)
        check_arguments(plan_fn, cache_plan_fn, self.cache_layers, positions)
        self.positions = positions
        self._rotary: nn.Module | None = None
        self.token_id = audio_token_id if audio_token_id is not None else _config_token_id(model)
        self.audio_spans = audio_spans
        self.stats = AttachStats()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped_caches: list[object] = []
        self._previous_attention: str | None = None
        self._input_ids: torch.Tensor | None = None
        self._state: PrefillState | None = None
        self._eager = False

    # ----------------------------------------------------------------- public
    def __enter__(self) -> Attachment:
        self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    @property
    def attached(self) -> bool:
        """True while hooks are registered."""
        return bool(self._handles)

    def attach(self) -> None:
        """Validate the model, switch the attention backend if scores are needed, and register every hook."""
        if self.attached:
            raise ValueError("this Attachment is already attached; use it once per `with` block.")
        if self.backbone.decoder in _ATTACHED:
            raise ValueError("a speechtrim reducer is already attached to this model; reducers do not stack: leave "
                             "the first one's `with` block before attaching another")
        self._check_model()
        _ATTACHED.add(self.backbone.decoder)
        self._claimed = True
        try:
            current = str(getattr(self.backbone.config, "_attn_implementation", None) or "eager")
            if (self.score_layers or self.cache_layers) and current != BACKEND_NAME:
                register_backend()
                if current == "eager":
                    logger.warning("this method reads attention scores, which speechtrim taps from SDPA: the text "
                                   "decoder runs SDPA instead of its eager attention while attached, so even ratio=0 "
                                   "is not bit-identical to the eager model (it is to the model under SDPA)")
                self._previous_attention = set_text_attn_implementation(self.model, BACKEND_NAME)
            self._eager = str(self.backbone.config._attn_implementation) == "eager"
            for wrapper in self._input_modules():
                self._handles.append(wrapper.register_forward_pre_hook(self._capture_input_ids, with_kwargs=True))
            decoder = self.backbone.decoder
            self._handles.append(decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
            for layer_idx, layer in enumerate(self.backbone.layers):
                hook = self._make_layer_hook(layer_idx)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
                if layer_idx in self.cache_layers:
                    evict = self._make_cache_hook(layer_idx)
                    self._handles.append(layer.self_attn.register_forward_hook(evict, with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook, restore the attention implementation, and forget per-call state."""
        if getattr(self, "_claimed", False):
            _ATTACHED.discard(self.backbone.decoder)
            self._claimed = False
        try:
            while self._handles:
                self._handles.pop().remove()
            for cache in self._wrapped_caches:
                vars(cache).pop("reorder_cache", None)
            self._wrapped_caches.clear()
        finally:
            if self._previous_attention is not None:
                previous, self._previous_attention = self._previous_attention, None
                set_text_attn_implementation(self.model, previous)
            self._state = None
            self._input_ids = None

    def layer_scores(self, layer_idx: int) -> torch.Tensor | None:
        """Scores (B, T) the decision at ``layer_idx`` got in the current prefill (from layer ``layer_idx - 1``)."""
        tap = self._state.taps.get(layer_idx) if self._state is not None else None
        return tap.scores if tap is not None else None

    def cache_scores(self, layer_idx: int) -> torch.Tensor | None:
        """Scores (B, T_l) of layer ``layer_idx``'s own attention that ``cache_plan_fn`` got in the current prefill."""
        return self._state.cache_scores.get(layer_idx) if self._state is not None else None

    def layer_keys(self, layer_idx: int) -> torch.Tensor | None:
        """Key states (B, H_kv, T, d) of layer ``layer_idx - 1``, for the decision at ``layer_idx`` (eq. 4)."""
        tap = self._state.taps.get(layer_idx) if self._state is not None else None
        return tap.keys if tap is not None else None

    # ----------------------------------------------------------------- setup
    def _check_model(self) -> None:
        check_text_decoder(self.backbone)
        if self.positions == "compact":
            self._rotary = compact_rotary(self.backbone)
        warn_untested_family(self.model, self.backbone)

    def _input_modules(self) -> list[nn.Module]:
        """Modules whose forward receives ``input_ids``: the model, and Qwen2.5-Omni's thinker."""
        modules = [self.model]
        thinker = getattr(self.model, "thinker", None)
        if isinstance(thinker, nn.Module):
            modules.append(thinker)
        return [module for module in modules if module is not self.backbone.decoder]

    # ----------------------------------------------------------------- hooks
    def _capture_input_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            self._input_ids = input_ids
        return None

    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_argument(kwargs)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        check_decoder_inputs(cache, mask)
        embeds = kwargs.get("inputs_embeds")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        sequence = embeds if embeds is not None else input_ids
        if sequence is None:
            return None
        batch, length = int(sequence.shape[0]), int(sequence.shape[1])
        prefill = cache is None or cache.get_seq_length(0) == 0
        if not prefill:
            if self._state is not None:
                self._state.decode_mask = mask.bool() if mask is not None else None
            return None
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            self._input_ids = input_ids
        span_id = prefill_span_ids(self.audio_spans, self.token_id, self._input_ids, batch, length, sequence.device)
        padding = None
        if mask is not None:
            padding = mask.bool()[:, -length:]  # (B, T0)
            if bool(padding.all()):
                padding = None
        self._state = PrefillState(original_length=length, padding=padding, span_id=span_id)
        depth = self.backbone.depth
        self.stats.tokens_per_layer = [0] * depth
        self.stats.rows_tokens_per_layer = [[] for _ in range(depth)]
        self.stats.removed_per_layer = [0] * depth
        self.stats.cache_removed_per_layer = [0] * depth
        self.stats.cache_tokens_per_layer = [0] * depth
        self.stats.prefill_calls += 1
        if cache is not None and "reorder_cache" not in vars(cache):
            self._wrap_reorder(cache)
        return None

    def _wrap_reorder(self, cache: object) -> None:
        """Make beam search's cache reordering also reorder the per-row layouts (instance attribute, undone later)."""
        original = cache.reorder_cache

        def reorder_cache(beam_idx: torch.LongTensor) -> None:
            original(beam_idx)
            state = self._state
            if state is not None:
                for layer_idx, valid in state.layouts.items():
                    state.layouts[layer_idx] = valid.index_select(0, beam_idx.to(valid.device))

        cache.reorder_cache = reorder_cache
        self._wrapped_caches.append(cache)

    def _make_layer_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, T_l, D)
            cache = cache_argument(kwargs)
            cached = cache.get_seq_length(layer_idx) if cache is not None else 0
            if cached == 0:
                hidden, kwargs = self._prefill_layer(layer_idx, hidden, kwargs, state)
            else:
                kwargs = self._decode_layer(layer_idx, hidden, cached, kwargs, state)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _make_cache_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            state = self._state
            tap = state.cache_taps.pop(layer_idx, None) if state is not None else None
            cache = cache_argument(kwargs)
            if tap is None or cache is None:
                return None  # decode step, no prefill tap, or use_cache=False: nothing to evict
            plan = evict_after_prefill(layer_idx, tap, cache, state, self.cache_plan_fn, self.backbone.depth)
            if plan is not None:
                self.stats.cache_removed_per_layer[layer_idx] = int(plan.removed[0])
                self.stats.cache_tokens_per_layer[layer_idx] = int(state.layouts[layer_idx][0].sum())
            return None

        return hook

    # ----------------------------------------------------------------- per layer: prefill, decode
    def _prefill_layer(
        self, layer_idx: int, hidden: torch.Tensor, kwargs: dict, state: PrefillState
    ) -> tuple[torch.Tensor, dict]:
        plan = None
        if hidden.shape[1] > 1:
            tap = state.taps.get(layer_idx)
            scores = tap.scores if tap is not None else None  # (B, T_l) or None
            plan = self.plan_fn(layer_idx, hidden, state.span_id, scores) if self.plan_fn is not None else None
            if plan is not None:
                check_plan(plan, layer_idx, state.span_id)
                hidden = apply_plan(plan, hidden)  # (B, T_new, D)
                state.span_id = state.span_id.gather(1, plan.source).masked_fill(plan.filler, -1)  # (B, T_new)
                state.accumulated = compose_plans(state.accumulated, plan)
                self.stats.removed_per_layer[layer_idx] = int(plan.removed[0])
        accumulated = state.accumulated
        valid = state.padding  # (B, T_l) queries/keys that are real tokens, None = all
        if accumulated is not None:
            if self._rotary is not None and state.first_position is None:
                state.first_position = first_position(kwargs.get("position_ids"), state.padding, hidden.shape[0])
            kwargs = self._gather_inputs(kwargs, accumulated, hidden)
            real = ~accumulated.filler  # (B, T_l)
            valid = real if state.padding is None else state.padding.gather(1, accumulated.source) & real
            state.layouts[layer_idx] = valid
            if self._rotary is not None:
                if state.compact is None or plan is not None:  # the layout changed at this layer
                    state.compact = compact_prefill_positions(
                        self._rotary, kwargs.get("position_ids"), hidden, valid, state.first_position
                    )
                kwargs["position_ids"], *tables = state.compact
                kwargs["position_embeddings"] = tuple(tables)
        real_tokens = valid.sum(dim=1) if valid is not None else torch.full((hidden.shape[0],), hidden.shape[1])
        self.stats.rows_tokens_per_layer[layer_idx] = [int(count) for count in real_tokens]  # padding excluded
        self.stats.tokens_per_layer[layer_idx] = int(real_tokens[0])
        self.stats.cache_tokens_per_layer[layer_idx] = int(real_tokens[0])
        decides = layer_idx + 1 in self.score_layers
        if (decides or layer_idx in self.cache_layers) and hidden.shape[1] > 1:
            tap = AttentionTap(query_valid=valid, keep_keys=decides)
            if decides:
                state.taps[layer_idx + 1] = tap
            if layer_idx in self.cache_layers:
                state.cache_taps[layer_idx] = tap
            kwargs[TAP_KWARG] = tap
        return hidden, kwargs

    def _gather_inputs(self, kwargs: dict, plan: Plan, hidden: torch.Tensor) -> dict:
        """Re-index the full-length position ids, rotary tables and mask with the accumulated plan (a copy)."""
        kwargs = gather_positions(kwargs, plan)  # position ids, cos, sin at the plan's sources
        kwargs["attention_mask"] = prefill_mask(kwargs.get("attention_mask"), plan, self._eager, hidden.dtype)
        return kwargs  # mask: (B, 1, T_l, T_l) or None

    def _decode_layer(
        self, layer_idx: int, hidden: torch.Tensor, cached: int, kwargs: dict, state: PrefillState
    ) -> dict:
        prefix = state.layouts.get(layer_idx)  # (B, T_l) bool, None = layer not reduced
        if prefix is None:
            return kwargs
        batch, query_length = hidden.shape[:2]
        new_valid = state.generated_columns(layer_idx, cached, batch, query_length)  # (B, generated + q) or None
        kwargs["attention_mask"] = decode_mask(
            prefix, new_valid, cached, query_length, kwargs.get("attention_mask"), self._eager, hidden.dtype
        )  # (B, 1, q, K) or None
        if self._rotary is not None:
            kwargs["position_ids"], kwargs["position_embeddings"] = compact_decode_positions(
                self._rotary, kwargs.get("position_ids"), hidden, prefix, state.padding, state.original_length
            )  # (B, q) ids minus the tokens removed before this layer; cos, sin (B, q, d)
        return kwargs


def _config_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return audio_token_id(config) if config is not None else None
