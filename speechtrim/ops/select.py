"""Token eviction (FastV, random_evict) and the shared "how many tokens to remove" rule, vectorised over batch."""

from __future__ import annotations

import logging
import math

import torch

from speechtrim.ops.plan import Plan, plan_from_slots
from speechtrim.ratio import check_ratio

logger = logging.getLogger(__name__)


def count_to_remove(num_audio: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens to remove per row: ``ratio * num_audio`` rounded half down, keeping at least one audio token.

    Rounding half down means 2.5 -> 2 and 2.51 -> 3 (computed in float64 as ``ceil(ratio * n - 0.5)``).
    The count is capped at ``n - 1`` so a row keeps at least one audio token (0 when the row has none).
    The count is a request: a row whose audio comes in several short spans may have fewer mergeable adjacent
    pairs than this; :func:`speechtrim.ops.merge.merge_plan` then merges what it can, warns once, and reports the
    tokens really removed in ``plan.removed``.

    Args:
        num_audio: (B,) long, reducible (audio) tokens in each row.
        ratio: fraction of them to remove, in [0, 1).
    """
    check_ratio(ratio, "ratio")
    num_audio = torch.as_tensor(num_audio).long()
    if bool((num_audio < 0).any()):
        raise ValueError(f"num_audio must be non-negative token counts, got {num_audio.tolist()}.")
    wanted = torch.ceil(num_audio.double() * float(ratio) - 0.5).long().clamp_min(0)  # (B,)
    return torch.minimum(wanted, (num_audio - 1).clamp_min(0))


def count_to_remove_int(num_audio: int, ratio: float) -> int:
    """Scalar twin of :func:`count_to_remove` (same rounding and cap), for FLOPs simulation.

    Args:
        num_audio: reducible tokens in one row.
        ratio: fraction to remove, in [0, 1).
    """
    check_ratio(ratio, "ratio")
    if num_audio < 0:
        raise ValueError(f"num_audio must be a non-negative token count, got {num_audio}.")
    wanted = max(math.ceil(num_audio * float(ratio) - 0.5), 0)
    return min(wanted, max(num_audio - 1, 0))


def evict_plan(scores: torch.Tensor, reducible: torch.Tensor, num_evict: torch.Tensor) -> Plan:
    """Plan to drop the ``num_evict[b]`` lowest-scoring reducible tokens of each row (FastV, random_evict).

    Ties go to the earlier token (it is dropped first). Non-reducible tokens (text, padding) are always kept. A row
    with fewer reducible tokens than asked drops all of them; ``plan.removed`` says how many went.

    Args:
        scores: (B, T) importance of each token (attention received for FastV, seeded random for random_evict).
        reducible: (B, T) bool, token may be dropped.
        num_evict: (B,) long, tokens to drop per row.
    """
    if scores.dim() != 2 or tuple(scores.shape) != tuple(reducible.shape):
        raise ValueError(
            f"evict_plan expects scores and reducible of the same shape (B, T), got {tuple(scores.shape)} and "
            f"{tuple(reducible.shape)}."
        )
    batch, length = scores.shape
    num_evict = torch.as_tensor(num_evict, device=scores.device).long().reshape(-1)
    if num_evict.shape[0] != batch or bool((num_evict < 0).any()):
        raise ValueError(f"num_evict must be (B,) = ({batch},) non-negative counts, got {num_evict.tolist()}.")
    reducible = reducible.bool()
    scores = scores if scores.is_floating_point() else scores.float()
    if bool(torch.isnan(scores[reducible]).any()):
        raise ValueError("eviction scores contain NaN on reducible tokens; check the attention tap or the seed.")
    # Non-reducible tokens get NaN, which an ascending sort puts after every number (+inf included).
    key = torch.where(reducible, scores, torch.full_like(scores, float("nan")))  # (B, T); rank 0 = evicted first
    order = key.sort(dim=1, stable=True).indices  # (B, T)
    positions = torch.arange(length, device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, T)
    evicted = reducible & (rank < num_evict.unsqueeze(1))  # (B, T)
    keep = ~evicted
    return plan_from_slots(keep, keep, torch.ones_like(scores))
