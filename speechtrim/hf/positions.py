"""Position ids and rotary tables of reduced decoder layers: re-indexed with a plan, or re-numbered compactly.

transformers 5.23's decoder computes ``position_ids`` and ``position_embeddings`` (cos, sin) once, at full length
(B or 1, T0), and passes the same objects to every layer. Once a plan has shrunk the sequence, a layer needs them
for its own (B, T_l) layout:

- ``positions="original"`` (default, FastV-style): survivors keep their original position ids and rotary tables,
  gathered at the accumulated plan's sources (:func:`gather_positions`).
- ``positions="compact"`` (the FastAdaSP reference release): from the first reduced layer on, each row's real tokens
  are re-numbered ``p0 + 0..n_l-1`` (``p0`` = the row's first real position, 0 under ``generate()``) and cos/sin are
  recomputed with the text decoder's rotary module (:func:`compact_prefill_positions`); a decode step at layer l takes
  the position ``generate()`` passes minus the tokens removed before layer l in that row
  (:func:`compact_decode_positions`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from speechtrim.hf.layers import TextBackbone
from speechtrim.ops.plan import Plan, gather_time

logger = logging.getLogger(__name__)

POSITION_MODES = ("original", "compact")


def gather_positions(kwargs: dict, plan: Plan) -> dict:
    """A copy of a layer's kwargs whose full-length position ids and rotary tables are re-indexed with ``plan``.

    Args:
        kwargs: the decoder layer's keyword arguments (``position_ids`` (B or 1, T0) or M-RoPE (3, B, T0);
            ``position_embeddings`` cos, sin: (B or 1, T0, d) or (3, B, T0, d)).
        plan: the accumulated plan, original (B, T0) -> current layout (B, T_l).
    """
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
    return kwargs


def compact_rotary(backbone: TextBackbone) -> nn.Module:
    """The text decoder's rotary module, refusing models whose positions are not plain 1-D (M-RoPE).

    Args:
        backbone: the text decoder the attachment hooks.
    """
    config = backbone.config
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        nested = list(params.values()) if isinstance(params, dict) else []
        if isinstance(params, dict) and any("mrope_section" in p for p in [params, *nested] if isinstance(p, dict)):
            raise ValueError(
                f"positions='compact' is not supported for {backbone.model_type!r}: it uses 3-D M-RoPE "
                "position ids (time, height, width), which a 1-D renumbering would corrupt; use "
                "positions='original'."
            )
    rotary = getattr(backbone.decoder, "rotary_emb", None)
    if not isinstance(rotary, nn.Module):
        raise ValueError(
            f"positions='compact' recomputes cos/sin with the text decoder's `rotary_emb` module, which "
            f"{type(backbone.decoder).__name__} does not have; use positions='original'."
        )
    return rotary


def plain_position_ids(position_ids: object) -> torch.Tensor:
    """The (B or 1, T) position ids a decoder layer got; refuses what compact positions cannot renumber.

    Args:
        position_ids: the layer's ``position_ids`` keyword argument.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else None
        raise ValueError(
            f"positions='compact' needs the (B, T) position ids the text decoder passes to its layers, got {shape}; "
            "this model family does not expose them (or uses 3-D M-RoPE): use positions='original'."
        )
    return position_ids


def first_position(position_ids: object, padding: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B,) original position of each row's first real (non-padding) token, from the full-length (B or 1, T0) ids.

    Args:
        position_ids: the full-length position ids the decoder passes to its layers.
        padding: (B, T0) bool, real tokens of the 2-D attention mask; None = no padding.
        batch: batch size B.
    """
    ids = plain_position_ids(position_ids)
    ids = ids.expand(batch, ids.shape[1])  # (B, T0)
    if padding is None:
        return ids[:, 0]
    first = padding.to(ids.device).long().argmax(dim=1, keepdim=True)  # (B, 1) first True column
    return ids.gather(1, first).squeeze(1)


def compact_prefill_positions(
    rotary: nn.Module, position_ids: object, hidden: torch.Tensor, valid: torch.Tensor, first: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact (B, T_l) position ids (real tokens ``first + 0..n_l-1``, others unchanged) and their cos, sin.

    Args:
        rotary: the text decoder's rotary module (see :func:`compact_rotary`).
        position_ids: the layer's position ids after :func:`gather_positions` (gathered at the plan's sources).
        hidden: (B, T_l, D) hidden states entering the layer (the rotary module reads their dtype and device).
        valid: (B, T_l) bool, real tokens (not padding, not filler).
        first: (B,) long, original position of each row's first real token.
    """
    original = plain_position_ids(position_ids)  # (B, T_l) gathered at the sources
    original = original.expand(valid.shape)
    rank = valid.long().cumsum(dim=1) - 1  # (B, T_l) index among the row's real tokens
    ids = torch.where(valid, first.to(original.device)[:, None] + rank, original)  # (B, T_l)
    cos, sin = rotary(hidden, ids)  # (B, T_l, d) each
    return ids, cos, sin


def compact_decode_positions(
    rotary: nn.Module,
    position_ids: object,
    hidden: torch.Tensor,
    layout: torch.Tensor,
    padding: torch.Tensor | None,
    original_length: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Position ids (B, q) of a decode step at a reduced layer, and their cos, sin: generate()'s minus those removed.

    Args:
        rotary: the text decoder's rotary module.
        position_ids: the (B or 1, q) position ids ``generate()`` passes for this step.
        hidden: (B, q, D) hidden states entering the layer.
        layout: (B, T_l) bool, the layer's prefill cache columns that are valid.
        padding: (B, T0) bool, real prompt tokens of the 2-D attention mask; None = no padding.
        original_length: T0, the prompt length at layer 0.
    """
    batch = hidden.shape[0]
    kept = layout.sum(dim=1)  # (B,) real tokens this layer's cache keeps per row
    total = torch.full_like(kept, original_length)  # (B,) real prompt tokens at layer 0
    if padding is not None:
        total = padding.sum(dim=1).to(kept.device)
    ids = plain_position_ids(position_ids)  # (B or 1, q) positions generate() passes
    ids = ids.expand(batch, -1) - (total - kept).to(ids.device)[:, None]  # (B, q) minus tokens removed
    return ids, rotary(hidden, ids)  # cos, sin: (B, q, d)
