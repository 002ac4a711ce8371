"""Attention masks for reduced layers: the prefill mask re-indexed by a plan, and the decode mask of a ragged cache.

A reduced layer's cache holds its own set of columns (``layout``: (B, T_l) bool, False for padding and filler
slots), so the decoder's one mask, sized from layer 0, does not fit it. These builders make the mask each layer
needs, in the type its attention expects (bool for SDPA, additive float for eager).
"""

from __future__ import annotations

import logging

import torch

from speechtrim.ops.plan import Plan

logger = logging.getLogger(__name__)


def to_mask_type(allowed: torch.Tensor, like: torch.Tensor | None, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> the type the layer's attention expects (bool for SDPA, additive for eager).

    Args:
        allowed: bool mask, True = attend.
        like: the mask the decoder built (its dtype wins when it is floating), or None.
        eager: the layer runs eager attention (additive mask).
        dtype: floating dtype to use when ``like`` gives none (the hidden states' dtype).
    """
    floating = eager or (like is not None and like.dtype != torch.bool)
    if not floating:
        return allowed
    mask_dtype = like.dtype if like is not None and like.dtype != torch.bool else dtype
    zero = torch.zeros((), dtype=mask_dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(mask_dtype).min)


def prefill_mask(
    mask: torch.Tensor | None, plan: Plan, eager: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """(B, 1, T_l, T_l) mask: the original mask's rows and columns at the sources, filler columns masked out.

    Args:
        mask: the decoder's full-length (B or 1, 1, T0, T0) mask, or None (plain causal).
        plan: the accumulated plan, original (B, T0) -> current layout (B, T_l).
        eager: the layer runs eager attention.
        dtype: the hidden states' dtype.
    """
    source, filler = plan.source, plan.filler  # (B, T_l)
    batch, length = source.shape
    if mask is None:
        increasing = bool((source[:, 1:] > source[:, :-1]).all())
        if increasing and not bool(filler.any()) and not eager:
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
    return to_mask_type(allowed[:, None], mask, eager, dtype)  # (B, 1, T_l, T_l)


def decode_mask(
    layout: torch.Tensor,
    new_valid: torch.Tensor | None,
    cached: int,
    query_length: int,
    like: torch.Tensor | None,
    eager: bool,
    dtype: torch.dtype,
    layout_full: bool | None = None,
) -> torch.Tensor | None:
    """(B, 1, q, K) mask of a decode step over a layer's ragged cache; None when plain causal does the same.

    Args:
        layout: (B, T_l) bool, the layer's prefill cache columns that are valid.
        new_valid: (B, generated + q) bool, the 2-D mask's columns after the prompt; None = all valid.
        cached: tokens in the layer's cache before this step (T_l + generated).
        query_length: q, tokens decoded in this step.
        like: the mask the decoder built for this step (gives the floating dtype), or None.
        eager: the layer runs eager attention.
        dtype: the hidden states' dtype.
        layout_full: whether every column of ``layout`` is valid, when the caller knows it (one decode step per
            layer per token: no column is built to find out); None looks.
    """
    if query_length == 1 and new_valid is None and layout_full:
        return None  # same as the stock decode mask without padding
    batch = layout.shape[0]
    generated = cached - layout.shape[1]
    if new_valid is None:
        new_valid = torch.ones(batch, generated + query_length, dtype=torch.bool, device=layout.device)
    valid = torch.cat([layout, new_valid.to(layout.device)], dim=1)  # (B, K) K = cached + q
    if query_length == 1 and bool(valid.all()):
        return None  # same as the stock decode mask without padding
    kv_length = valid.shape[1]
    columns = torch.arange(kv_length, device=valid.device)[None, :] - cached  # (1, K) new tokens >= 0
    rows = torch.arange(query_length, device=valid.device)[:, None]  # (q, 1)
    allowed = valid[:, None, None, :] & (columns <= rows)[None, None]  # (B, 1, q, K)
    return to_mask_type(allowed, like, eager, dtype)
