"""KV-cache eviction right after a layer's prefill attention (H2O, Zhang et al. 2023): the cache really shrinks.

H2O keeps, in each layer's KV cache, the tokens that received the most attention plus the recent ones, and evicts
the rest. Unlike the masking-only baseline of the FastAdaSP release, speechtrim edits
``cache.layers[i].keys / .values`` so the memory is freed: after layer ``i``'s attention has run over the whole
prefill, a forward hook on its attention module asks the method for a :class:`~speechtrim.ops.plan.Plan` built
from the attention each key received *in layer i itself*, and replaces the layer's cache tensors by the kept (or
merged) columns. Hidden states and every other layer are untouched, so
the prefill costs the same; decode attends over the shrunken cache, whose per-row valid columns (the "layout") the
attachment keeps so that padded batches and beam search work.

This module holds the tensor side (apply a plan to a cache layer, the new layout, cache bytes) and the eviction
step itself (:func:`evict_with_plan`); the hook that calls it lives in :class:`speechtrim.hf.attach.Attachment`
(methods with ``acts_on="cache"``).
"""

from __future__ import annotations

import logging
import torch

from speechtrim.hf.checks import check_plan
from speechtrim.hf.state import PrefillState
from speechtrim.ops.plan import Plan, apply_plan, plan_rows

logger = logging.getLogger(__name__)

def is_eviction(plan: Plan) -> bool:
    """True when every slot of the plan holds exactly one old token or is a filler (no merges).

    Args:
        plan: the reduction plan.
    """
    kept = (plan.slot >= 0).sum(dim=1) + plan.filler.sum(dim=1)  # (B,)
    return bool((kept == plan.new_length).all())


def shrink_states(plan: Plan, states: torch.Tensor, eviction: bool | None = None) -> torch.Tensor:
    """Apply a plan to cached key or value states along time: (B, H_kv, T, d) -> (B, H_kv, T_new, d), contiguous.

    Eviction plans copy the kept columns (fillers copy column ``source``, to be masked out); merge plans take the
    weighted mean of each slot's members, as :func:`~speechtrim.ops.plan.apply_plan` does for hidden states.

    Args:
        plan: the reduction plan for B rows of T cached tokens.
        states: (B, H_kv, T, d) keys or values of one cache layer.
        eviction: ``is_eviction(plan)`` when the caller knows it already (None: computed here).
    """
    if states.dim() != 4 or states.shape[0] != plan.batch or states.shape[2] != plan.old_length:
        raise ValueError(
            f"a cache plan for ({plan.batch}, {plan.old_length}) tokens does not fit cache states of shape "
            f"{tuple(states.shape)} (B, H_kv, T, d); build the plan from the scores and span_id of the same layer."
        )
    batch, heads, _, width = states.shape
    if is_eviction(plan) if eviction is None else eviction:
        source = plan.source.to(states.device)
        if batch == 1:  # whole (d,) rows copied: cheaper than an element-wise gather, short or long
            return states.index_select(2, source[0])  # (1, H_kv, T_new, d), contiguous
        index = source[:, None, :, None].expand(batch, heads, plan.new_length, width)
        return states.gather(2, index)  # (B, H_kv, T_new, d), contiguous: one copy
    flat = states.transpose(1, 2).reshape(batch, plan.old_length, heads * width)  # (B, T, H_kv * d)
    kept = apply_plan(plan, flat).view(batch, plan.new_length, heads, width)  # (B, T_new, H_kv, d)
    return kept.transpose(1, 2).contiguous()  # (B, H_kv, T_new, d)


def shrink_cache_layer(layer: object, plan: Plan, eviction: bool | None = None) -> tuple[int, int]:
    """Replace one cache layer's ``keys`` and ``values`` by their planned columns; return (old, new) lengths.

    The old tensors are dropped, so their memory is freed once nothing else refers to them.

    Args:
        layer: a ``transformers.cache_utils.DynamicLayer`` (``keys`` / ``values`` of shape (B, H_kv, T, d)).
        plan: the reduction plan for the layer's B rows of T cached tokens.
        eviction: ``is_eviction(plan)`` when the caller knows it already (None: computed here).
    """
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4:
        raise ValueError(
            f"cache layer {type(layer).__name__} has no (B, H_kv, T, d) keys/values to evict from; KV-cache eviction "
            "needs a DynamicCache (the default of generate())."
        )
    old_length = int(keys.shape[2])
    eviction = is_eviction(plan) if eviction is None else eviction
    layer.keys = shrink_states(plan, keys, eviction)  # (B, H_kv, T_new, d)
    layer.values = shrink_states(plan, values, eviction)  # (B, H_kv, T_new, d_v)
    return old_length, plan.new_length


def cache_layout(valid: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """Valid cache columns after a cache plan: (B, T_new) bool (False for padding and filler slots).

    Args:
        valid: (B, T) bool, columns valid before the plan (None = all).
        plan: the cache plan.
    """
    if valid is None:
        return ~plan.filler
    return valid.gather(1, plan.source.to(valid.device)) & ~plan.filler.to(valid.device)


def kv_cache_bytes(cache: object) -> int:
    """Bytes held by a cache's key and value tensors, summed over layers (what eviction frees).

    Args:
        cache: a ``DynamicCache`` (anything with ``.layers`` of objects holding ``keys`` / ``values``).
    """
    total = 0
    for layer in getattr(cache, "layers", ()):
        for states in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(states, torch.Tensor):
                total += states.numel() * states.element_size()
    return total


def evict_with_plan(layer_idx: int, plan: Plan, cache: object, state: PrefillState, depth: int) -> None:
    """Shrink layer ``layer_idx``'s KV cache with ``plan`` (built from that layer's own prefill attention) and
    record its new cache layout in ``state.layouts`` (every other layer gets a layout too: layer 0's no longer
    sizes the decode mask).

    Args:
        layer_idx: the cache layer whose attention just ran over the prefill.
        plan: the method's plan for that layer's (B, T) cached tokens.
        cache: the decoder's ``DynamicCache``.
        state: the attachment's state for the current prefill.
        depth: number of decoder layers.
    """
    evict_layers_with_plan([layer_idx], plan, cache, state, depth)


def evict_layers_with_plan(layers: list[int], plan: Plan, cache: object, state: PrefillState, depth: int) -> None:
    """:func:`evict_with_plan` for several layers at once: ``plan`` holds their steps stacked as rows (layer
    ``layers[i]`` is rows ``i * B .. (i + 1) * B - 1``), so that checks, layouts and the eviction test run once for
    all of them, and each layer's keys and values are shrunk by its own rows.

    Args:
        layers: the cache layers, in the order of their rows in ``plan``; none evicted yet in this prefill.
        plan: the method's plan for (len(layers) * B, T) cached tokens.
        cache: the decoder's ``DynamicCache``.
        state: the attachment's state for the current prefill.
        depth: number of decoder layers.
    """
    batch = state.span_id.shape[0]
    check_plan(plan, layers[-1], state.span_id.repeat(len(layers), 1), caller="cache eviction")
    for layer_idx in layers:
        if cache.layers[layer_idx].get_seq_length() != plan.old_length:
            raise ValueError(
                f"layer {layer_idx}'s cache holds {cache.layers[layer_idx].get_seq_length()} tokens but its prefill "
                f"saw {plan.old_length}; KV-cache eviction needs a fresh cache per prompt (no prefix reuse)."
            )
    state.fill_layouts(depth)
    before = state.layouts[layers[0]]  # (B, T): every layer's prefill layout is the prompt's own before eviction
    layouts = cache_layout(before.repeat(len(layers), 1), plan)  # (L * B, T_kept)
    eviction = is_eviction(plan)
    for row, layer_idx in enumerate(layers):
        shrink_cache_layer(cache.layers[layer_idx], plan_rows(plan, row * batch, (row + 1) * batch), eviction)
        state.layouts[layer_idx] = layouts[row * batch : (row + 1) * batch]
