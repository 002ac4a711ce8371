"""Attach a training-free token reducer to any Hugging Face decoder with removable hooks (no forks, no patches).

transformers 5.23's decoder loop computes ``position_embeddings`` (cos, sin), ``position_ids`` and the causal mask
once, at full length, and hands the same objects to every layer. An :class:`Attachment` registers a forward
pre-hook (``with_kwargs=True``) on every decoder layer. During prefill a layer's hook asks ``plan_fn`` for a
:class:`~speechtrim.ops.plan.Plan`, shrinks ``hidden_states`` with it, and - at that layer and every later one -
re-indexes the full-length position ids, rotary tables and mask with the plan accumulated so far. The KV cache
comes out ragged (e.g. ``[40, 40, 25, 25]``); at decode time each reduced layer's mask is rebuilt for its own cache
layout, which is what lets left-padded ``generate()`` work. Everything is undone in ``detach`` (``finally``).

Usage::

    with Attachment(model, plan_fn, score_layers={3}) as attachment:
        model.generate(**inputs)
    attachment.stats.tokens_per_layer   # e.g. [40, 40, 40, 25, ...]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from speechtrim.hf.attention import BACKEND_NAME, TAP_KWARG, AttentionTap, register_backend
from speechtrim.hf.layers import TextBackbone, set_text_attn_implementation, text_backbone
from speechtrim.hf.spans import AudioSpans, audio_token_id, span_ids_from_input_ids, span_ids_from_spans
from speechtrim.ops.plan import Plan, apply_plan, gather_time

logger = logging.getLogger(__name__)

PlanFn = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], "Plan | None"]
SUPPORTED_ATTENTION = ("sdpa", "eager", BACKEND_NAME)
TESTED_FAMILIES = ("llama", "qwen2", "qwen2_audio", "voxtral")
_warned_families: set[str] = set()


@dataclass
class AttachStats:
    """What the last prefill did, layer by layer.

    Args:
        tokens_per_layer: prefill tokens each decoder layer processed in batch row 0 (filler slots excluded).
        removed_per_layer: tokens removed from batch row 0 by the plan taken at each layer (0 where none).
        prefill_calls: prefill forward passes seen while attached.
    """

    tokens_per_layer: list[int] = field(default_factory=list)
    removed_per_layer: list[int] = field(default_factory=list)
    prefill_calls: int = 0


@dataclass
class _Prefill:
    """Per-forward state of one prefill and of the decode steps that follow it."""

    original_length: int
    padding: torch.Tensor | None  # (B, T0) bool from the 2-D attention mask, None = no padding
    span_id: torch.Tensor  # (B, T_l) long, current layout
    accumulated: Plan | None = None  # original (B, T0) -> current layout (B, T_l)
    taps: dict[int, AttentionTap] = field(default_factory=dict)  # decision layer -> tap of the layer before
    layouts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T_l) bool, cache columns valid
    decode_mask: torch.Tensor | None = None  # (B, T0 + generated) bool, 2-D mask of the current decode call


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


def _check_plan(plan: Plan, layer_idx: int, span_id: torch.Tensor) -> None:
    """Refuse plans of the wrong shape, and plans that evict or merge tokens outside audio spans."""
    batch, length = span_id.shape
    if plan.batch != batch or plan.old_length != length or plan.source.shape[0] != batch:
        raise ValueError(
            f"plan_fn returned a plan for ({plan.batch}, {plan.old_length}) tokens at layer {layer_idx}, but the "
            f"layer sees ({batch}, {length}); build the plan from the hidden states passed to plan_fn."
        )
    text = span_id < 0  # (B, T)
    own_index = torch.arange(length, device=span_id.device).expand(batch, length)
    kept_alone = (plan.slot >= 0) & (plan.source.gather(1, plan.slot.clamp(min=0)) == own_index)
    if bool((text & ~kept_alone).any()):
        raise ValueError(
            f"the plan at layer {layer_idx} evicts or merges tokens outside audio spans (span_id == -1); reducers "
            "may only touch audio tokens: restrict the plan to span_id >= 0."
        )


def _to_mask_type(allowed: torch.Tensor, like: torch.Tensor | None, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> the type the layer's attention expects (bool for SDPA, additive for eager)."""
    floating = eager or (like is not None and like.dtype != torch.bool)
    if not floating:
        return allowed
    mask_dtype = like.dtype if like is not None and like.dtype != torch.bool else dtype
    zero = torch.zeros((), dtype=mask_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(mask_dtype).min)


class Attachment:
    """Reversible hooks that let ``plan_fn`` shrink the audio tokens of a Hugging Face decoder during prefill.

    Args:
        model: a Hugging Face causal LM or composite speech LLM (DynamicCache only; "sdpa" or "eager" attention).
        plan_fn: ``plan_fn(layer_idx, hidden (B, T, D), span_id (B, T), attn_scores (B, T) or None) -> Plan | None``,
            called at every decoder layer during prefill; None keeps the tokens as they are.
        score_layers: layers whose decision needs attention scores. The decision at layer i gets the attention each
            key received in layer i - 1 (summed over heads and valid queries, FastAdaSP eq. 5); layer 0 gets None.
            Non-empty switches the text decoder to the ``speechtrim_sdpa`` backend while attached.
        audio_spans: explicit audio spans, one list of ``(start, end)`` per batch row, or a (B, T) ``span_id``
            tensor; None finds them from ``input_ids == audio token id``.
        audio_token_id: overrides the audio token id read from the model config.
    """

    def __init__(
        self,
        model: nn.Module,
        plan_fn: PlanFn,
        score_layers: Collection[int] = (),
        audio_spans: AudioSpans | torch.Tensor | None = None,
        audio_token_id: int | None = None,
    ) -> None:
        self.model = model
        self.plan_fn = plan_fn
        self.backbone: TextBackbone = text_backbone(model)
        self.score_layers = frozenset(int(layer) for layer in score_layers)
        bad = sorted(layer for layer in self.score_layers if not 0 <= layer < self.backbone.depth)
        if bad:
            raise ValueError(
                f"score_layers {bad} are outside the decoder's layers 0..{self.backbone.depth - 1}; pick layers "
                "that exist."
            )
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
            if self.score_layers and current != BACKEND_NAME:
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

    def layer_keys(self, layer_idx: int) -> torch.Tensor | None:
        """Key states (B, H_kv, T, d) of layer ``layer_idx - 1``, for the decision at ``layer_idx`` (eq. 4)."""
        tap = self._state.taps.get(layer_idx) if self._state is not None else None
        return tap.keys if tap is not None else None

    # ----------------------------------------------------------------- setup
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
        family = str(getattr(getattr(self.model, "config", config), "model_type", "unknown"))
        if family not in TESTED_FAMILIES and self.backbone.model_type not in TESTED_FAMILIES:
            if family not in _warned_families:
                _warned_families.add(family)
                logger.warning(
                    "model family %r is untested with speechtrim reducers (tested: %s); check the outputs.",
                    family,
                    ", ".join(TESTED_FAMILIES),
                )

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
        if hidden.shape[1] > 1:
            tap = state.taps.get(layer_idx)
            scores = tap.scores if tap is not None else None  # (B, T_l) or None
            plan = self.plan_fn(layer_idx, hidden, state.span_id, scores)
            if plan is not None:
                _check_plan(plan, layer_idx, state.span_id)
                hidden = apply_plan(plan, hidden)  # (B, T_new, D)
                state.span_id = state.span_id.gather(1, plan.source).masked_fill(plan.filler, -1)  # (B, T_new)
                state.accumulated = _compose(state.accumulated, plan)
                self.stats.removed_per_layer[layer_idx] = int(plan.removed[0])
        accumulated = state.accumulated
        valid = state.padding  # (B, T_l) queries/keys that are real tokens, None = all
        if accumulated is not None:
            kwargs = self._gather_inputs(kwargs, accumulated, hidden)
            real = ~accumulated.filler  # (B, T_l)
            valid = real if state.padding is None else state.padding.gather(1, accumulated.source) & real
            state.layouts[layer_idx] = valid
            self.stats.tokens_per_layer[layer_idx] = int(real[0].sum())
        else:
            self.stats.tokens_per_layer[layer_idx] = int(hidden.shape[1])
        if layer_idx + 1 in self.score_layers and hidden.shape[1] > 1:
            tap = AttentionTap(query_valid=valid)
            state.taps[layer_idx + 1] = tap
            kwargs[TAP_KWARG] = tap
        return hidden, kwargs

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
        kwargs["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), plan, hidden)
        return kwargs

    def _prefill_mask(self, mask: torch.Tensor | None, plan: Plan, hidden: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T_l, T_l) mask: the original mask's rows and columns at the sources, filler columns masked out."""
        source, filler = plan.source, plan.filler  # (B, T_l)
        batch, length = source.shape
        if mask is None:
            increasing = bool((source[:, 1:] > source[:, :-1]).all())
            if increasing and not bool(filler.any()) and not self._eager:
                return None  # still plain causal: SDPA's is_causal path, as without the attachment
            allowed = source[:, None, :] <= source[:, :, None]  # (B, T_l, T_l) key source <= query source
        else:
            full = mask[:, 0].expand(batch, -1, -1)  # (B, T0, T0)
            rows = torch.arange(batch, device=mask.device)[:, None, None]
            gathered = full[rows, source[:, :, None], source[:, None, :]]  # (B, T_l, T_l)
            allowed = gathered if gathered.dtype == torch.bool else gathered == 0
        allowed = allowed & ~filler[:, None, :]
        diagonal = torch.eye(length, dtype=torch.bool, device=source.device)[None]  # filler rows see themselves
        allowed = allowed | (diagonal & filler[:, :, None])
        return _to_mask_type(allowed[:, None], mask, self._eager, hidden.dtype)  # (B, 1, T_l, T_l)

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
        new_valid = torch.ones(batch, generated + query_length, dtype=torch.bool, device=prefix.device)
        if state.decode_mask is not None:
            tail = state.decode_mask[:, state.original_length :]  # (B, generated + q)
            if tail.shape[1] != generated + query_length:
                raise ValueError(
                    f"the attention mask has {state.decode_mask.shape[1]} columns, expected "
                    f"{state.original_length + generated + query_length} (prompt + generated); extend the 2-D mask "
                    "by one column per generated token, as generate() does."
                )
            new_valid = tail.to(prefix.device)
        valid = torch.cat([prefix, new_valid], dim=1)  # (B, K) K = cached + q
        if query_length == 1 and bool(valid.all()):
            kwargs["attention_mask"] = None  # same as the stock decode mask without padding
            return kwargs
        kv_length = valid.shape[1]
        columns = torch.arange(kv_length, device=valid.device)[None, :] - cached  # (1, K) new tokens >= 0
        rows = torch.arange(query_length, device=valid.device)[:, None]  # (q, 1)
        allowed = valid[:, None, None, :] & (columns <= rows)[None, None]  # (B, 1, q, K)
        kwargs["attention_mask"] = _to_mask_type(allowed, kwargs.get("attention_mask"), self._eager, hidden.dtype)
        return kwargs


def _config_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return audio_token_id(config) if config is not None else None
