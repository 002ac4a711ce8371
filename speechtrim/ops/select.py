"""Token eviction (FastV, random_evict) and the shared "how many tokens to remove" rule, vectorised over batch."""

from __future__ import annotations

import logging
import math

import torch

from speechtrim.ops.plan import Plan, eviction_plan
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
    return removal_count_unchecked(num_audio, float(ratio))


def removal_count_unchecked(num_audio: int, ratio: float) -> int:
    """:func:`count_to_remove_int` without its argument checks, for loops that validated once (the FLOPs solver)."""
    return min(max(math.ceil(num_audio * ratio - 0.5), 0), max(num_audio - 1, 0))


def span_lengths(span_id: torch.Tensor) -> torch.Tensor:
    """(B, S) tokens of each audio span per row, S = the largest span id + 1 (0 for ids a row lacks).

    Args:
        span_id: (B, T) long, span number of each token; -1 = not reducible.
    """
    spans = int(span_id.max()) + 1 if span_id.numel() else 0
    counts = torch.zeros(span_id.shape[0], max(spans, 1), dtype=torch.long, device=span_id.device)
    audio = span_id >= 0
    counts.scatter_add_(1, span_id.clamp(min=0), audio.long())
    return counts[:, :spans]


def span_counts_to_remove(span_id: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, S) tokens to remove from each audio span: :func:`count_to_remove` of the span's own length.

    Each span then keeps a number of tokens fixed by its length and the ratio alone, whatever the content: what a
    serving engine needs to size an audio placeholder before the embeddings exist (pre-LLM methods).

    Args:
        span_id: (B, T) long, span number of each token; -1 = not reducible.
        ratio: fraction of each span's tokens to remove, in [0, 1).
    """
    lengths = span_lengths(span_id)  # (B, S)
    return count_to_remove(lengths.reshape(-1), ratio).reshape(lengths.shape)


def top_per_span(scores: torch.Tensor, span_id: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, the ``counts[b, s]`` highest-scoring items of every span s of every row (ties: earlier first).

    Items with span id -1 are never chosen; NaN scores rank last.

    Args:
        scores: (B, T) float, one score per item (token, or adjacent pair).
        span_id: (B, T) long, span of each item; -1 = not selectable.
        counts: (B, S) long, items to choose per span (from :func:`span_counts_to_remove` or similar).
    """
    if scores.shape != span_id.shape or scores.dim() != 2:
        raise ValueError(f"top_per_span expects scores and span_id of one shape (B, T), got {tuple(scores.shape)} "
                         f"and {tuple(span_id.shape)}")
    batch, length = scores.shape
    if length == 0:
        return torch.zeros_like(span_id, dtype=torch.bool)
    key = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores.float())
    by_score = key.sort(dim=1, descending=True, stable=True).indices  # (B, T)
    score_rank = torch.empty_like(by_score).scatter_(1, by_score, torch.arange(length, device=scores.device)
                                                     .expand_as(by_score))
    group = torch.where(span_id >= 0, span_id, torch.full_like(span_id, int(span_id.max()) + 1))
    order = (group * length + score_rank).sort(dim=1).indices  # grouped by span, best score first
    grouped = group.gather(1, order)  # (B, T)
    index = torch.arange(length, device=scores.device).expand(batch, length)
    opens = torch.ones_like(grouped, dtype=torch.bool)
    opens[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    first = torch.where(opens, index, torch.zeros_like(index)).cummax(dim=1).values
    rank_in_span = index - first  # (B, T), in sorted order
    padded = torch.cat([counts.long(), torch.zeros(batch, 1, dtype=torch.long, device=counts.device)], dim=1)
    limit = padded.gather(1, grouped.clamp(max=padded.shape[1] - 1))
    chosen_sorted = (rank_in_span < limit) & (span_id.gather(1, order) >= 0)
    return torch.zeros_like(chosen_sorted).scatter_(1, order, chosen_sorted)


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
    if bool(torch.isnan(scores).logical_and_(reducible).any()):
        raise ValueError("eviction scores contain NaN on reducible tokens; check the attention tap or the seed.")
    # Non-reducible tokens get NaN, which an ascending sort puts after every number (+inf included).
    key = torch.where(reducible, scores, torch.full_like(scores, float("nan")))  # (B, T); rank 0 = evicted first
    order = key.sort(dim=1, stable=True).indices  # (B, T)
    positions = torch.arange(length, device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # (B, T)
    evicted = reducible & (rank < num_evict.unsqueeze(1))  # (B, T)
    return eviction_plan(~evicted, scores.dtype)
