"""Attach a training-free token reducer to any Hugging Face decoder with removable hooks (no forks, no patches).

transformers 5.23's decoder loop computes ``position_embeddings`` (cos, sin), ``position_ids`` and the causal mask
once, at full length, and hands the same objects to every layer. An :class:`Attachment` registers a forward
pre-hook (``with_kwargs=True``) on every decoder layer. During prefill a layer's hook asks ``plan_fn`` for a
:class:`~speechtrim.ops.plan.Plan`, shrinks ``hidden_states`` with it, and - at that layer and every later one -
re-indexes the full-length position ids, rotary tables and mask with the plan accumulated so far. The KV cache
comes out ragged (e.g. ``[40, 40, 25, 25]``); at decode time each reduced layer's mask is rebuilt for its own cache
layout, which is what lets left-padded ``generate()`` work. Everything is undone in ``detach`` (``finally``).

KV-cache evictors (H2O) pass ``cache_plan_fn`` and ``cache_layers`` instead of (or besides) ``plan_fn``: right
after a cache layer's attention has run over the prefill, a forward hook on its attention module applies the plan
built from that layer's own attention scores to ``cache.layers[i].keys / .values`` (see :mod:`.kv_evict`).

Positions: by default (``positions="original"``) survivors keep their original position ids and rotary tables,
as FastV-style code does. ``positions="compact"`` re-numbers, from the first reduced layer on, each row's real
tokens ``p0 + 0..n_l-1`` (``p0`` = the row's first real position, 0 under ``generate()``), as the FastAdaSP
reference release does, and recomputes cos/sin with the text decoder's rotary module; a decode step at layer l
takes the position ``generate()`` passes minus the tokens removed before layer l in that row.

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
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from speechtrim.hf.attention import BACKEND_NAME, TAP_KWARG, AttentionTap, register_backend
from speechtrim.hf.kv_evict import CachePlanFn, cache_layout, shrink_cache_layer
from speechtrim.hf.layers import TextBackbone, set_text_attn_implementation, text_backbone
from speechtrim.hf.masks import decode_mask, prefill_mask
from speechtrim.hf.spans import AudioSpans, audio_token_id, span_ids_from_input_ids, span_ids_from_spans
from speechtrim.ops.plan import Plan, apply_plan, gather_time

logger = logging.getLogger(__name__)

PlanFn = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], "Plan | None"]
SUPPORTED_ATTENTION = ("sdpa", "eager", BACKEND_NAME)
POSITION_MODES = ("original", "compact")
TESTED_FAMILIES = ("llama", "qwen2", "qwen2_audio", "voxtral", "granite_speech", "qwen2_5_omni_thinker")
_warned_families: set[str] = set()


@dataclass
class AttachStats:
    """What the last prefill did, layer by layer.

    Args:
        tokens_per_layer: prefill tokens each decoder layer processed in batch row 0 (filler slots excluded).
        removed_per_layer: tokens removed from batch row 0 by the plan taken at each layer (0 where none).
        prefill_calls: prefill forward passes seen while attached.
        cache_tokens_per_layer: valid KV-cache columns each layer holds after prefill in batch row 0 (padding and
            filler slots excluded), after any cache eviction.
        cache_removed_per_layer: cache columns evicted (or merged away) from batch row 0 at each layer after its
            prefill attention (0 where none).
    """

    tokens_per_layer: list[int] = field(default_factory=list)
    removed_per_layer: list[int] = field(default_factory=list)
    prefill_calls: int = 0
    cache_tokens_per_layer: list[int] = field(default_factory=list)
    cache_removed_per_layer: list[int] = field(default_factory=list)


@dataclass
class _Prefill:
    """Per-forward state of one prefill and of the decode steps that follow it."""

    original_length: int
    padding: torch.Tensor | None  # (B, T0) bool from the 2-D attention mask, None = no padding
    span_id: torch.Tensor  # (B, T_l) long, current layout
    accumulated: Plan | None = None  # original (B, T0) -> current layout (B, T_l)
    taps: dict[int, AttentionTap] = field(default_factory=dict)  # decision layer -> tap of the layer before
    cache_taps: dict[int, AttentionTap] = field(default_factory=dict)  # cache layer -> tap of that same layer
    cache_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # cache layer -> (B, T_l) scores used
    layouts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T_l) bool, cache columns valid
    decode_mask: torch.Tensor | None = None  # (B, T0 + generated) bool, 2-D mask of the current decode call
    first_position: torch.Tensor | None = None  # (B,) long, original position of each row's first real token
    compact: tuple[torch.Tensor, ...] | None = None  # compact (B, T_l) ids, cos, sin of the current layout


def _compose(first: Plan | None, second: Plan) -> Plan:
    """The plan that applies ``first`` then ``second``, expressed on the original (B, T0) sequence."""
    if first is None:
        return second
    slot = torch.where(
        first.slot >= 0, second.slot.gather(1, first.slot.clamp(min=0)), torch.full_like(first.slot, -1)
    )  # (B, T0)
    return Plan(
        slot=slot,
        weight=(slot >= 0).to(first.weight.dtype),
        source=first.source.gather(1, second.source),  # (B, T_new)
        filler=second.filler | first.filler.gather(1, second.source),  # (B, T_new)
        removed=first.removed + second.removed,
    )


def _check_plan(plan: Plan, layer_idx: int, span_id: torch.Tensor, caller: str = "plan_fn") -> None:
    """Refuse plans of the wrong shape, and plans that evict or merge tokens outside audio spans."""
    batch, length = span_id.shape
    if plan.batch != batch or plan.old_length != length or plan.source.shape[0] != batch:
        raise ValueError(
            f"{caller} returned a plan for ({plan.batch}, {plan.old_length}) tokens at layer {layer_idx}, but the "
            f"layer sees ({batch}, {length}); build the plan from the span_id (B, T) passed to {caller}."
        )
    text = span_id < 0  # (B, T)
    own_index = torch.arange(length, device=span_id.device).expand(batch, length)
    kept_alone = (plan.slot >= 0) & (plan.source.gather(1, plan.slot.clamp(min=0)) == own_index)
    if bool((text & ~kept_alone).any()):
        raise ValueError(
            f"the {caller} plan at layer {layer_idx} evicts or merges tokens outside audio spans (span_id == -1); "
            "reducers may only touch audio tokens: restrict the plan to span_id >= 0."
        )


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
        self.score_layers = self._layer_set(score_layers, "score_layers")
        self.cache_layers = self._layer_set(cache_layers, "cache_layers")
        if plan_fn is None and cache_plan_fn is None:
            raise ValueError(
                "an Attachment needs plan_fn (reduce hidden states) or cache_plan_fn (evict from the KV cache); "
                "pass at least one."
            )
        if (cache_plan_fn is None) != (not self.cache_layers):
            raise ValueError(
                "cache_plan_fn and cache_layers go together: pass the layers whose KV cache cache_plan_fn reduces "
                f"(got cache_plan_fn={'set' if cache_plan_fn else 'None'}, cache_layers={sorted(self.cache_layers)})."
            )
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if positions == "compact" and cache_plan_fn is not None:
            raise ValueError(
                "positions='compact' re-numbers the tokens a hidden-state plan keeps, but KV-cache evictors "
                "(cache_plan_fn, e.g. h2o) keep the evicted cache's rotary keys as they are and do not renumber: use "
                "positions='original' with them."
            )
        self.positions = positions
        self._rotary: nn.Module | None = None
        self.token_id = audio_token_id if audio_token_id is not None else _config_token_id(model)
        self.audio_spans = audio_spans
        self.stats = AttachStats()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped_caches: list[object] = []
        self._previous_attention: str | None = None
        self._input_ids: torch.Tensor | None = None
        self._state: _Prefill | None = None
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
        self._check_model()
        try:
            current = str(getattr(self.backbone.config, "_attn_implementation", None) or "eager")
            if (self.score_layers or self.cache_layers) and current != BACKEND_NAME:
                register_backend()
                if current == "eager":
                    logger.info("attention scores are tapped from SDPA: switching the text decoder from eager")
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
    def _layer_set(self, layers: Collection[int], name: str) -> frozenset[int]:
        chosen = frozenset(int(layer) for layer in layers)
        bad = sorted(layer for layer in chosen if not 0 <= layer < self.backbone.depth)
        if bad:
            raise ValueError(
                f"{name} {bad} are outside the decoder's layers 0..{self.backbone.depth - 1}; pick layers that exist."
            )
        return chosen

    def _check_model(self) -> None:
        config = self.backbone.config
        implementation = str(getattr(config, "_attn_implementation", None) or "eager")
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {implementation!r} is not supported by speechtrim reducers; call "
                "model.set_attn_implementation('sdpa') (or load with attn_implementation='sdpa') first."
            )
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise ValueError(
                f"the text decoder has non-full attention layers ({sorted(set(layer_types))}); speechtrim reducers "
                "support full causal attention only: disable sliding windows in the config."
            )
        if self.positions == "compact":
            self._rotary = self._compact_rotary()
        family = str(getattr(getattr(self.model, "config", config), "model_type", "unknown"))
        if family not in TESTED_FAMILIES and self.backbone.model_type not in TESTED_FAMILIES:
            if family not in _warned_families:
                _warned_families.add(family)
                logger.warning(
                    "model family %r is untested with speechtrim reducers (tested: %s); check the outputs.",
                    family,
                    ", ".join(TESTED_FAMILIES),
                )

    def _compact_rotary(self) -> nn.Module:
        """The text decoder's rotary module, refusing models whose positions are not plain 1-D (M-RoPE)."""
        config = self.backbone.config
        for name in ("rope_parameters", "rope_scaling"):
            params = getattr(config, name, None)
            nested = list(params.values()) if isinstance(params, dict) else []
            if isinstance(params, dict) and any("mrope_section" in p for p in [params, *nested] if isinstance(p, dict)):
                raise ValueError(
                    f"positions='compact' is not supported for {self.backbone.model_type!r}: it uses 3-D M-RoPE "
                    "position ids (time, height, width), which a 1-D renumbering would corrupt; use "
                    "positions='original'."
                )
        rotary = getattr(self.backbone.decoder, "rotary_emb", None)
        if not isinstance(rotary, nn.Module):
            raise ValueError(
                f"positions='compact' recomputes cos/sin with the text decoder's `rotary_emb` module, which "
                f"{type(self.backbone.decoder).__name__} does not have; use positions='original'."
            )
        return rotary

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
        from transformers.cache_utils import DynamicCache

        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"{type(cache).__name__} is not supported while a reducer is attached: reduced layers keep "
                "different numbers of tokens, which only a DynamicCache can hold; use DynamicCache() (the default "
                "of generate()) instead of a static cache."
            )
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ValueError(
                "a reducer needs the 2-D (B, T) padding attention mask (or None); got "
                f"{type(mask).__name__} {getattr(mask, 'shape', '')}: pass the tokenizer's attention_mask."
            )
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
        span_id = self._span_id(batch, length, sequence.device)
        padding = None
        if mask is not None:
            padding = mask.bool()[:, -length:]  # (B, T0)
            if bool(padding.all()):
                padding = None
        self._state = _Prefill(original_length=length, padding=padding, span_id=span_id)
        self.stats.tokens_per_layer = [0] * self.backbone.depth
        self.stats.removed_per_layer = [0] * self.backbone.depth
        self.stats.cache_removed_per_layer = [0] * self.backbone.depth
        self.stats.cache_tokens_per_layer = [0] * self.backbone.depth
        self.stats.prefill_calls += 1
        if cache is not None and "reorder_cache" not in vars(cache):
            self._wrap_reorder(cache)
        return None

    def _span_id(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """(B, T0) span ids for this prefill from explicit spans or from the captured input ids."""
        spans = self.audio_spans
        if isinstance(spans, torch.Tensor):
            span_id = spans.to(device=device, dtype=torch.long)
        elif spans is not None:
            rows = len(spans)
            span_id = span_ids_from_spans(spans, rows, length, device)
        elif self.token_id is not None and self._input_ids is not None:
            if tuple(self._input_ids.shape) != (batch, length):
                raise ValueError(
                    f"input_ids {tuple(self._input_ids.shape)} do not line up with the decoder input ({batch}, "
                    f"{length}) (legacy audio-token expansion?); expand audio tokens in the processor or pass "
                    "audio_spans= explicitly."
                )
            return span_ids_from_input_ids(self._input_ids.to(device), self.token_id)
        else:
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
            cache = kwargs.get("past_key_values")
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

    # ----------------------------------------------------------------- prefill
    def _prefill_layer(
        self, layer_idx: int, hidden: torch.Tensor, kwargs: dict, state: _Prefill
    ) -> tuple[torch.Tensor, dict]:
        plan = None
        if hidden.shape[1] > 1:
            tap = state.taps.get(layer_idx)
            scores = tap.scores if tap is not None else None  # (B, T_l) or None
            plan = self.plan_fn(layer_idx, hidden, state.span_id, scores) if self.plan_fn is not None else None
            if plan is not None:
                _check_plan(plan, layer_idx, state.span_id)
                hidden = apply_plan(plan, hidden)  # (B, T_new, D)
                state.span_id = state.span_id.gather(1, plan.source).masked_fill(plan.filler, -1)  # (B, T_new)
                state.accumulated = _compose(state.accumulated, plan)
                self.stats.removed_per_layer[layer_idx] = int(plan.removed[0])
        accumulated = state.accumulated
        valid = state.padding  # (B, T_l) queries/keys that are real tokens, None = all
        if accumulated is not None:
            if self._rotary is not None and state.first_position is None:
                state.first_position = _first_position(kwargs.get("position_ids"), state.padding, hidden.shape[0])
            kwargs = self._gather_inputs(kwargs, accumulated, hidden)
            real = ~accumulated.filler  # (B, T_l)
            valid = real if state.padding is None else state.padding.gather(1, accumulated.source) & real
            state.layouts[layer_idx] = valid
            if self._rotary is not None:
                if state.compact is None or plan is not None:  # the layout changed at this layer
                    state.compact = self._compact_prefill(kwargs, hidden, valid, state.first_position)
                kwargs["position_ids"], *tables = state.compact
                kwargs["position_embeddings"] = tuple(tables)
            self.stats.tokens_per_layer[layer_idx] = int(real[0].sum())
        else:
            self.stats.tokens_per_layer[layer_idx] = int(hidden.shape[1])
        self.stats.cache_tokens_per_layer[layer_idx] = int(valid[0].sum()) if valid is not None else hidden.shape[1]
        decides = layer_idx + 1 in self.score_layers
        if (decides or layer_idx in self.cache_layers) and hidden.shape[1] > 1:
            tap = AttentionTap(query_valid=valid, keep_keys=decides)
            if decides:
                state.taps[layer_idx + 1] = tap
            if layer_idx in self.cache_layers:
                state.cache_taps[layer_idx] = tap
            kwargs[TAP_KWARG] = tap
        return hidden, kwargs

    def _make_cache_hook(self, layer_idx: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            state = self._state
            tap = state.cache_taps.pop(layer_idx, None) if state is not None else None
            cache = kwargs.get("past_key_values")
            if tap is None or cache is None:
                return None  # decode step, no prefill tap, or use_cache=False: nothing to evict
            scores = tap.scores  # (B, T_l) attention each key of THIS layer received
            if scores is None:
                raise ValueError(
                    f"layer {layer_idx}'s attention recorded no scores; the text decoder must run the {BACKEND_NAME!r} "
                    "backend while a KV-cache evictor is attached: do not switch attention inside the `with` block."
                )
            state.cache_scores[layer_idx] = scores
            plan = self.cache_plan_fn(layer_idx, scores, state.span_id)
            if plan is None:
                return None
            _check_plan(plan, layer_idx, state.span_id, caller="cache_plan_fn")
            entry = cache.layers[layer_idx]
            if entry.get_seq_length() != plan.old_length:
                raise ValueError(
                    f"layer {layer_idx}'s cache holds {entry.get_seq_length()} tokens but its prefill saw "
                    f"{plan.old_length}; KV-cache eviction needs a fresh cache per prompt (no prefix reuse)."
                )
            self._fill_layouts(state)
            layout = cache_layout(state.layouts[layer_idx], plan)  # (B, T_kept)
            shrink_cache_layer(entry, plan)  # keys/values (B, H_kv, T_kept, d); the full tensors are dropped
            state.layouts[layer_idx] = layout
            self.stats.cache_removed_per_layer[layer_idx] = int(plan.removed[0])
            self.stats.cache_tokens_per_layer[layer_idx] = int(layout[0].sum())
            return None

        return hook

    def _fill_layouts(self, state: _Prefill) -> None:
        """Give every layer a cache layout once any cache is evicted: layer 0's no longer sizes the decode mask."""
        length = state.original_length
        base = state.padding
        if base is None:
            base = torch.ones(state.span_id.shape[0], length, dtype=torch.bool, device=state.span_id.device)
        for layer_idx in range(self.backbone.depth):
            state.layouts.setdefault(layer_idx, base)  # (B, T0); layers with a hidden plan overwrite theirs

    def _gather_inputs(self, kwargs: dict, plan: Plan, hidden: torch.Tensor) -> dict:
        """Re-index the full-length position ids, rotary tables and mask with the accumulated plan."""
        kwargs = dict(kwargs)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor):
            batch_dim = 1 if position_ids.dim() == 3 else 0  # (3, B, T) M-RoPE or (B, T)
            kwargs["position_ids"] = gather_time(plan, position_ids, dim=-1, batch_dim=batch_dim)
        embeddings = kwargs.get("position_embeddings")
        if embeddings is not None:
            kwargs["position_embeddings"] = tuple(
                gather_time(plan, table, dim=table.dim() - 2, batch_dim=table.dim() - 3) for table in embeddings
            )  # cos, sin: (B, T_l, d) or (3, B, T_l, d)
        kwargs["attention_mask"] = prefill_mask(kwargs.get("attention_mask"), plan, self._eager, hidden.dtype)
        return kwargs

    # ----------------------------------------------------------------- decode
    def _decode_layer(self, layer_idx: int, hidden: torch.Tensor, cached: int, kwargs: dict, state: _Prefill) -> dict:
        prefix = state.layouts.get(layer_idx)  # (B, T_l) bool, None = layer not reduced
        if prefix is None:
            return kwargs
        batch, query_length = hidden.shape[:2]
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
        new_valid = None  # (B, generated + q) bool, None = all valid
        if state.decode_mask is not None:
            new_valid = state.decode_mask[:, state.original_length :]
            if new_valid.shape[1] != generated + query_length:
                raise ValueError(
                    f"the attention mask has {state.decode_mask.shape[1]} columns, expected "
                    f"{state.original_length + generated + query_length} (prompt + generated); extend the 2-D mask "
                    "by one column per generated token, as generate() does."
                )
        kwargs["attention_mask"] = decode_mask(
            prefix, new_valid, cached, query_length, kwargs.get("attention_mask"), self._eager, hidden.dtype
        )  # (B, 1, q, K) or None
        if self._rotary is not None:
            kept = prefix.sum(dim=1)  # (B,) real tokens this layer's cache keeps per row
            total = torch.full_like(kept, state.original_length)  # (B,) real prompt tokens at layer 0
            if state.padding is not None:
                total = state.padding.sum(dim=1).to(kept.device)
            ids = _plain_position_ids(kwargs.get("position_ids"))  # (B or 1, q) positions generate() passes
            ids = ids.expand(batch, -1) - (total - kept).to(ids.device)[:, None]  # (B, q) minus tokens removed
            kwargs["position_ids"] = ids
            kwargs["position_embeddings"] = self._rotary(hidden, ids)  # cos, sin: (B, q, d)
        return kwargs

    # ----------------------------------------------------------------- compact positions
    def _compact_prefill(
        self, kwargs: dict, hidden: torch.Tensor, valid: torch.Tensor, first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compact (B, T_l) position ids (real tokens ``first + 0..n_l-1``, others unchanged) and their cos, sin.

        Args:
            kwargs: the layer's kwargs after :meth:`_gather_inputs` (position ids gathered at the plan's sources).
            hidden: (B, T_l, D) hidden states entering the layer (the rotary module reads their dtype and device).
            valid: (B, T_l) bool, real tokens (not padding, not filler).
            first: (B,) long, original position of each row's first real token.
        """
        original = _plain_position_ids(kwargs.get("position_ids"))  # (B, T_l) gathered at the sources
        original = original.expand(valid.shape)
        rank = valid.long().cumsum(dim=1) - 1  # (B, T_l) index among the row's real tokens
        ids = torch.where(valid, first.to(original.device)[:, None] + rank, original)  # (B, T_l)
        cos, sin = self._rotary(hidden, ids)  # (B, T_l, d) each
        return ids, cos, sin


def _plain_position_ids(position_ids: object) -> torch.Tensor:
    """The (B or 1, T) position ids a decoder layer got; refuses what compact positions cannot renumber."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else None
        raise ValueError(
            f"positions='compact' needs the (B, T) position ids the text decoder passes to its layers, got {shape}; "
            "this model family does not expose them (or uses 3-D M-RoPE): use positions='original'."
        )
    return position_ids


def _first_position(position_ids: object, padding: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B,) original position of each row's first real (non-padding) token, from the full-length (B or 1, T0) ids."""
    ids = _plain_position_ids(position_ids)
    ids = ids.expand(batch, ids.shape[1])  # (B, T0)
    if padding is None:
        return ids[:, 0]
    first = padding.to(ids.device).long().argmax(dim=1, keepdim=True)  # (B, 1) first True column
    return ids.gather(1, first).squeeze(1)


def _config_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return audio_token_id(config) if config is not None else None
