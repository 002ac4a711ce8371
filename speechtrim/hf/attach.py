"""Attach a token reducer to any Hugging Face decoder with removable hooks (no forks, no patches).

transformers 5.23's decoder loop computes ``position_embeddings`` (cos, sin), ``position_ids`` and the causal mask
once, at full length, and hands the same objects to every layer. An :class:`Attachment` registers a forward
pre-hook (``with_kwargs=True``) on every decoder layer and runs one method (a :class:`~speechtrim.reducers.Reducer`)
directly:

- at the start of every prefill it asks the method for the ratio of every layer (``prefill_ratios``, from the
  prompt's token counts); the layers with a ratio > 0 are this prefill's active layers;
- a hidden-state method (``acts_on="hidden"``): at an active layer's pre-hook the attachment builds the whole
  :class:`~speechtrim.reduction.LayerStep` (hidden states, span ids, valid mask, how many to remove, and the
  scores and keys of the layer before when the method ``needs`` them), calls ``method.plan(step)``, shrinks
  ``hidden_states`` with the plan and - at that layer and every later one - re-indexes the full-length position
  ids, rotary tables (:mod:`.positions`) and mask (:mod:`.masks`) with the plan accumulated so far. The KV cache
  comes out ragged (e.g. ``[40, 40, 25, 25]``);
- a cache evictor (``acts_on="cache"``): right after an active layer's attention has run over the prefill, a
  forward hook on its attention module builds the step from that layer's own scores and shrinks
  ``cache.layers[i].keys / .values`` with the plan (:mod:`.kv_evict`); the prefill itself is unchanged. On a short
  prompt a method that declares ``stacks_layers`` (h2o, snapkv) has every layer's step planned in one call after
  the last active layer (``STACKED_EVICTION_BYTES``): the same plans for a fraction of the operators;
- a layer whose ratio removes no token in any row is skipped, with the scoring pass that would have fed it.

At decode time each reduced layer's mask is rebuilt for its own cache layout, which is what lets left-padded
``generate()`` and beam search work. Everything is undone in ``detach`` (``finally``). What a prefill leaves for
its decode steps lives in :mod:`.state`; what the attachment refuses, in :mod:`.checks`. Survivors keep their
original position ids by default; ``positions="compact"`` re-numbers them as the FastAdaSP reference release does.

Usage::

    with Attachment(model, reducers.build("fastadasp", ratio=0.3, layer=3)) as stats:
        model.generate(**inputs)
    stats.tokens_per_layer   # e.g. [40, 40, 40, 25, ...]
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from speechtrim.hf.attention import BACKEND_NAME, TAP_KWARG, AttentionTap, register_backend
from speechtrim.hf.checks import (  # SUPPORTED_ATTENTION, TESTED_FAMILIES, POSITION_MODES: still importable from here
    SUPPORTED_ATTENTION,  # noqa: F401
    TESTED_FAMILIES,  # noqa: F401
    check_decoder_inputs,
    check_method,
    check_plan,
    check_text_decoder,
    warn_untested_family,
)
from speechtrim.hf.kv_evict import evict_layers_with_plan, evict_with_plan
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
from speechtrim.reduction import LayerStep, ReductionStats

logger = logging.getLogger(__name__)

# decoders that have a reducer attached right now (reducers do not stack); weak, so models are never kept alive
_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# A cache evictor that declares ``stacks_layers`` plans every layer of a prefill in one call after the last active
# layer's attention when the prompt's whole KV cache is at most this big: at 73 tokens the 30 per-layer plans and
# evictions of h2o cost ~12 ms of operator dispatch, one stacked plan ~2 ms. Above it each layer is evicted right
# after its own attention, so that a long prompt's full caches never coexist (the prefill's peak memory).
STACKED_EVICTION_BYTES = 64 * 2**20

class Attachment:
    """Reversible hooks that run one reduction method inside a Hugging Face decoder; ``with`` yields its stats.

    Args:
        model: a Hugging Face causal LM or composite speech LLM (DynamicCache only; "sdpa" or "eager" attention).
        method: what to run: an object with ``name``, ``acts_on`` ("hidden" or "cache"), ``needs`` (subset of
            {"scores", "keys"}), ``positions``, ``resolve_layer(model, depth)``, ``prefill_ratios(layer, shape,
            text_tokens, audio_tokens)``, ``score_queries(valid, span_id)`` and ``plan(step) -> Plan | None``, as
            :class:`speechtrim.reducers.Reducer` has. Scores: for a hidden-state method, the attention each key
            received in the layer before the step's layer (summed over heads and the chosen queries, FastAdaSP
            eq. 5); for a cache evictor, in the step's own layer. Needing scores or keys switches the text decoder
            to the ``speechtrim_sdpa`` backend while attached.
        audio_spans: explicit audio spans, one list of ``(start, end)`` per batch row, or a (B, T) ``span_id``
            tensor; None finds them from ``input_ids == audio token id``.
        audio_token_id: overrides the audio token id read from the model config.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Any,
        audio_spans: AudioSpans | torch.Tensor | None = None,
        audio_token_id: int | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.backbone: TextBackbone = text_backbone(model)
        check_method(method)
        # A pre-LLM method on a model that splices its own audio embeddings: the decoder's input embeddings are
        # reduced before layer 0 and the survivors renumbered 0..n-1, which is what the LLM would compute on the
        # shorter prompt (only M-RoPE models keep their original position ids, see _check_model).
        self.positions = "compact" if method.acts_on == "embeddings" else method.positions
        self.shape = self.backbone.shape
        layer, source = method.resolve_layer(model, self.backbone.depth)
        if method.acts_on == "embeddings" and layer != 0:
            raise ValueError(f"{method.name} reduces the audio embeddings before the LLM, so it runs before layer 0, "
                             f"not at layer {layer}")
        if getattr(method, "needs_ctc_head", False):
            raise ValueError(f"{method.name} reads CTC logits over the LLM's vocabulary, which a Hugging Face model "
                             "does not provide: run it on speechtrim's SpeechLM with projector='vocab' (the embedded "
                             "model), or use pre_merge, samp or segment_topk here")
        self.stats = ReductionStats(method.name, method.acts_on, layer, source, self.backbone.depth,
                                    self.backbone.hidden_size, self.backbone.intermediate_size)
        self._evicts = method.acts_on == "cache"
        self._rotary: nn.Module | None = None
        self.token_id = audio_token_id if audio_token_id is not None else _config_token_id(model)
        self.audio_spans = audio_spans
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped_caches: list[object] = []
        self._previous_attention: str | None = None
        self._input_ids: torch.Tensor | None = None
        self._state: PrefillState | None = None
        self._eager = False

    # ----------------------------------------------------------------- public
    def __enter__(self) -> ReductionStats:
        self.attach()
        return self.stats

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
            if self.method.needs and current != BACKEND_NAME:
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
                if self._evicts:
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

    # ----------------------------------------------------------------- setup
    def _check_model(self) -> None:
        check_text_decoder(self.backbone)
        if self.positions == "compact":
            try:
                self._rotary = compact_rotary(self.backbone)
            except ValueError:
                if self.method.acts_on != "embeddings":
                    raise
                logger.warning("%s: %s keeps its original position ids (M-RoPE), so the reduced prompt's positions "
                               "have gaps where tokens were removed", self.method.name, self.backbone.model_type)
                self.positions = "original"
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
                self._state.set_decode_mask(mask)
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
        self._plan_prefill(self._state)
        self._state.stack_until = self._stack_until(self._state, sequence)
        if cache is not None and "reorder_cache" not in vars(cache):
            self._wrap_reorder(cache)
        return None

    def _plan_prefill(self, state: PrefillState) -> None:
        """Fix this prefill's per-layer ratios, each row's from its own token counts (a FLOPs target is solved per
        prompt; row 0's decide which layers are active and are what the stats record); refuse a batch without
        audio."""
        span_id = state.span_id
        if not bool((span_id >= 0).any()):
            raise ValueError(
                f"{self.method.name}: no audio tokens in this batch (looked for audio token id {self.token_id}); "
                "pass audio_spans=[[(start, end)], ...] or the right audio_token_id=, or run without the reducer"
            )
        valid = (state.padding.sum(dim=1) if state.padding is not None
                 else torch.full((span_id.shape[0],), span_id.shape[1])).tolist()
        audio = (span_id >= 0).sum(dim=1).tolist()
        solved: dict[tuple[int, int], list[float]] = {}
        for counts in zip(valid, audio):
            if counts not in solved:
                solved[counts] = self.method.prefill_ratios(self.stats.layer, self.shape, counts[0] - counts[1],
                                                            counts[1])
        state.ratios = solved[valid[0], audio[0]]
        state.row_ratios = {}
        if len(solved) > 1:  # rows whose counts differ run their own ratios at row 0's active layers
            per_row = [solved[counts] for counts in zip(valid, audio)]
            for layer_idx, ratio in enumerate(state.ratios):
                rows = [ratios[layer_idx] for ratios in per_row]
                if state.row_ratios.setdefault(ratio, rows) != rows:  # two layers share row 0's ratio, not others'
                    logger.debug("layer %d: rows differ from another layer at ratio %g; row 0's ratio for all",
                                 layer_idx, ratio)
                    state.row_ratios[ratio] = [ratio] * len(rows)
        self.stats.start_prefill(state.ratios, input_tokens=int(valid[0]))

    def _stack_until(self, state: PrefillState, sequence: torch.Tensor) -> int | None:
        """The last active layer when this prefill's cache evictions are planned together (None: layer by layer)."""
        method = self.method
        if not self._evicts or not getattr(method, "stacks_layers", False) or "keys" in method.needs:
            return None
        active = [layer_idx for layer_idx, ratio in enumerate(state.ratios) if self._removes(state, ratio)]
        backbone = self.backbone
        itemsize = sequence.element_size() if sequence.is_floating_point() else 4
        cache_bytes = (sequence.shape[0] * sequence.shape[1] * backbone.depth * 2 * backbone.num_kv_heads
                       * backbone.head_dim * itemsize)
        return active[-1] if len(active) > 1 and cache_bytes <= STACKED_EVICTION_BYTES else None

    def _removal(self, state: PrefillState, ratio: float) -> torch.Tensor:
        """(B,) tokens a layer at ``ratio`` removes from each row of the current layout (counted once per layout)."""
        return self._counted(state, ratio)[1]

    def _removes(self, state: PrefillState, ratio: float) -> bool:
        """Whether a layer at ``ratio`` removes any token of the current layout. A layer that removes none (a small
        ratio on a short prompt: FastAdaSP decay's last layers) is skipped, with the scoring of the layer before it
        or of its own attention: its plan would keep every token as it is."""
        return ratio > 0 and self._counted(state, ratio)[2]

    def _counted(self, state: PrefillState, ratio: float) -> tuple[torch.Tensor, torch.Tensor, bool]:
        counted = state.removal.get(ratio)
        if counted is None or counted[0] is not state.span_id:
            rows = state.row_ratios.get(ratio)
            if rows is None or all(own == ratio for own in rows):
                num_remove = self.method.removal_counts(state.span_id, ratio)  # (B,)
            else:  # each row its own ratio, counted on its own span ids
                num_remove = torch.cat([self.method.removal_counts(state.span_id[row : row + 1], own)
                                        for row, own in enumerate(rows)])
            counted = state.removal[ratio] = (state.span_id, num_remove, bool(num_remove.any()))
        return counted

    def _step(self, layer_idx: int, state: PrefillState, hidden: torch.Tensor | None, valid: torch.Tensor | None,
              tap: AttentionTap | None, keys: torch.Tensor | None) -> LayerStep:
        """The complete step of an active layer: everything the method may read, and how many tokens to remove."""
        needs = self.method.needs
        scores = tap.scores if tap is not None else None
        keys = keys if keys is not None else (tap.keys if tap is not None else None)
        if "scores" in needs and scores is None or "keys" in needs and keys is None:
            raise RuntimeError(
                f"{self.method.name}: layer {layer_idx} got no attention scores or keys; the text decoder must run "
                f"the {BACKEND_NAME!r} backend while this method is attached: do not switch attention inside the "
                "`with` block."
            )
        ratio = state.ratios[layer_idx]
        num_remove = self._removal(state, ratio)
        self.stats.requested_per_layer[layer_idx] = int(num_remove[0])
        return LayerStep(layer_idx, hidden, state.span_id, num_remove, ratio, valid,
                         scores if "scores" in needs else None, keys if "keys" in needs else None)

    def _record(self, step: LayerStep, plan: Plan) -> None:
        self.stats.removed_per_layer[step.layer] = int(plan.removed[0])
        if bool((plan.removed < step.num_remove).any()):
            self.stats.short_layers.append(step.layer)
            logger.info("layer %d: spans too short, removed %s of requested %s tokens", step.layer,
                        plan.removed.tolist(), step.num_remove.tolist())

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
            pending = state.cache_pending.pop(layer_idx, None) if state is not None else None
            cache = cache_argument(kwargs)
            if pending is None or cache is None:
                return None  # decode step, inactive layer, or use_cache=False: nothing to evict
            valid, tap = pending
            if state.stack_until is not None:
                state.stacked.append((layer_idx, valid, tap))
                if layer_idx == state.stack_until:
                    self._evict_stacked(cache, state)
                return None
            entry = cache.layers[layer_idx]
            step = self._step(layer_idx, state, None, valid, tap, getattr(entry, "keys", None))
            plan = self.method.plan(step)
            if plan is not None:
                evict_with_plan(layer_idx, plan, cache, state, self.backbone.depth)
                self._record(step, plan)
                self.stats.cache_tokens_per_layer[layer_idx] = int(state.layouts[layer_idx][0].sum())
            return None

        return hook

    def _evict_stacked(self, cache: object, state: PrefillState) -> None:
        """Evict every waiting layer: the steps of the layers that share a ratio are stacked as rows of one step
        (layer ``i`` of the group is rows ``i * B .. (i + 1) * B - 1``; ``step.layer`` is the group's last layer),
        planned by one call of the method, and applied layer by layer; plans, caches and stats are those of the
        layer-by-layer path (a method may stack only when its plan of a row depends on that row's step alone)."""
        waiting, state.stacked = state.stacked, []
        groups: dict[float, list[tuple[int, torch.Tensor | None, AttentionTap | None]]] = {}
        for entry in waiting:
            groups.setdefault(state.ratios[entry[0]], []).append(entry)
        batch = state.span_id.shape[0]
        short_layers: list[int] = []
        for ratio, group in groups.items():
            layers = [layer_idx for layer_idx, _, _ in group]
            count = len(layers)
            valid = group[0][1]
            num_remove = self._removal(state, ratio).repeat(count)  # (L * B,)
            taps = [tap for _, _, tap in group]
            scores = torch.cat([tap.scores for tap in taps]) if all(tap is not None for tap in taps) else None
            if "scores" in self.method.needs and scores is None:
                self._step(layers[0], state, None, valid, None, None)  # raises: the layer's scores are missing
            step = LayerStep(layers[-1], None, state.span_id.repeat(count, 1), num_remove, ratio,
                             valid.repeat(count, 1) if valid is not None else None, scores, None)
            requested = int(num_remove[0])
            plan = self.method.plan(step)
            for layer_idx in layers:
                self.stats.requested_per_layer[layer_idx] = requested
            if plan is None:
                continue
            evict_layers_with_plan(layers, plan, cache, state, self.backbone.depth)
            removed = plan.removed.view(count, batch)
            short = (removed < num_remove.view(count, batch)).any(dim=1).tolist()
            kept = torch.stack([state.layouts[layer_idx][0] for layer_idx in layers]).sum(dim=1).tolist()
            for row, layer_idx in enumerate(layers):
                self.stats.removed_per_layer[layer_idx] = int(removed[row, 0])
                self.stats.cache_tokens_per_layer[layer_idx] = int(kept[row])
                if short[row]:
                    short_layers.append(layer_idx)
                    logger.info("layer %d: spans too short, removed %s of requested %s tokens", layer_idx,
                                removed[row].tolist(), num_remove[:batch].tolist())
        self.stats.short_layers.extend(sorted(short_layers))  # in layer order, as the layer-by-layer path lists them

    # ----------------------------------------------------------------- per layer: prefill, decode
    def _prefill_layer(
        self, layer_idx: int, hidden: torch.Tensor, kwargs: dict, state: PrefillState
    ) -> tuple[torch.Tensor, dict]:
        plan = None
        if hidden.shape[1] > 1 and not self._evicts and self._removes(state, state.ratios[layer_idx]):
            step = self._step(layer_idx, state, hidden, self._valid(state), state.taps.get(layer_idx), None)
            plan = self.method.plan(step)
            if plan is not None:
                check_plan(plan, layer_idx, state.span_id)
                hidden = apply_plan(plan, hidden)  # (B, T_new, D)
                state.span_id = state.span_id.gather(1, plan.source).masked_fill(plan.filler, -1)  # (B, T_new)
                state.accumulated = compose_plans(state.accumulated, plan)
                self._record(step, plan)
        accumulated = state.accumulated
        valid = self._valid(state)  # (B, T_l) queries/keys that are real tokens, None = all
        if accumulated is not None:
            if self._rotary is not None and state.first_position is None:
                state.first_position = first_position(kwargs.get("position_ids"), state.padding, hidden.shape[0])
            kwargs = self._gather_inputs(kwargs, accumulated, hidden)
            state.layouts[layer_idx] = valid
            if self._rotary is not None:
                if state.compact is None or plan is not None:  # the layout changed at this layer
                    state.compact = compact_prefill_positions(
                        self._rotary, kwargs.get("position_ids"), hidden, valid, state.first_position
                    )
                kwargs["position_ids"], *tables = state.compact
                kwargs["position_embeddings"] = tuple(tables)
        real_tokens = valid.sum(dim=1).tolist() if valid is not None else [hidden.shape[1]] * hidden.shape[0]
        self.stats.rows_tokens_per_layer[layer_idx] = real_tokens  # padding excluded
        self.stats.tokens_per_layer[layer_idx] = real_tokens[0]
        self.stats.cache_tokens_per_layer[layer_idx] = real_tokens[0]
        if hidden.shape[1] > 1:
            kwargs = self._request_tap(layer_idx, valid, state, kwargs)
        return hidden, kwargs

    @staticmethod
    def _valid(state: PrefillState) -> torch.Tensor | None:
        """(B, T_l) real tokens of the current layout (None = all)."""
        accumulated = state.accumulated
        if accumulated is None:
            return state.padding
        real = ~accumulated.filler
        return real if state.padding is None else state.padding.gather(1, accumulated.source) & real

    def _request_tap(self, layer_idx: int, valid: torch.Tensor | None, state: PrefillState, kwargs: dict) -> dict:
        """Ask this layer's attention for what the method needs: for the next layer's hidden-state step, or for
        this layer's own cache eviction."""
        needs = self.method.needs
        if self._evicts:
            if not self._removes(state, state.ratios[layer_idx]):
                return kwargs
            tap = AttentionTap(query_valid=self._score_queries(valid, state), keep_keys=False) \
                if "scores" in needs else None  # the keys are read from the cache itself, so the tap holds none
            state.cache_pending[layer_idx] = (valid, tap)
        elif needs and layer_idx + 1 < self.shape.depth and self._removes(state, state.ratios[layer_idx + 1]):
            tap = AttentionTap(query_valid=self._score_queries(valid, state),
                               keep_scores="scores" in needs, keep_keys="keys" in needs)
            state.taps[layer_idx + 1] = tap
        else:
            return kwargs
        if tap is not None:
            kwargs[TAP_KWARG] = tap
        return kwargs

    def _score_queries(self, valid: torch.Tensor | None, state: PrefillState) -> torch.Tensor | None:
        """The method's ``score_queries`` of a layer, computed once while valid columns and span ids stay the same."""
        known = state.queries
        if known is None or known[0] is not valid or known[1] is not state.span_id:
            known = state.queries = (valid, state.span_id, self.method.score_queries(valid, state.span_id))
        return known[2]

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
            prefix, new_valid, cached, query_length, kwargs.get("attention_mask"), self._eager, hidden.dtype,
            layout_full=state.layout_is_full(layer_idx) if query_length == 1 and new_valid is None else None,
        )  # (B, 1, q, K) or None
        if self._rotary is not None:
            kwargs["position_ids"], kwargs["position_embeddings"] = compact_decode_positions(
                self._rotary, kwargs.get("position_ids"), hidden, prefix, state.padding, state.original_length
            )  # (B, q) ids minus the tokens removed before this layer; cos, sin (B, q, d)
        return kwargs


def _config_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return audio_token_id(config) if config is not None else None
