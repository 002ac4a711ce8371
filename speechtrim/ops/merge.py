"""Adjacent audio-token merging (FastAdaSP section 3.2 / appendix A.3, eqs. 4-6), vectorised over batch and tokens.

FastAdaSP scores each adjacent pair of audio tokens by the cosine similarity of their key states (eq. 4), picks the
top-k most similar pairs, chains consecutive picked pairs into clusters, and replaces each cluster by the mean of
its members weighted by the attention they receive (eqs. 5-6). ``avg_merge`` is the same with uniform weights,
``random_merge`` the same with random pair scores, and ``a_tome`` merges disjoint pairs only (``chain=False``).
Picking k pairs always removes exactly k tokens, both when chained and when disjoint.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from speechtrim.ops.plan import Plan, identity_plan, plan_from_slots

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Log a warning the first time a given key is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def flatten_heads(keys: torch.Tensor) -> torch.Tensor:
    """Turn per-head key states (B, H, T, d_head) into one key vector per token (B, T, H * d_head).

    Args:
        keys: (B, H, T, d_head) key states, as attention layers hold them.
    """
    if keys.dim() != 4:
        raise ValueError(f"flatten_heads expects keys of shape (B, H, T, d_head), got {tuple(keys.shape)}.")
    batch, heads, length, head_dim = keys.shape
    return keys.transpose(1, 2).reshape(batch, length, heads * head_dim)  # (B, T, H * d_head)


def same_span_pairs(span_id: torch.Tensor) -> torch.Tensor:
    """Which adjacent pairs (i, i+1) lie inside one reducible span.

    Args:
        span_id: (B, T) long, span number of each token per row; -1 = not reducible (text, padding).
    """
    return (span_id[:, :-1] == span_id[:, 1:]) & (span_id[:, :-1] >= 0)  # (B, T-1)


def adjacent_similarity(keys: torch.Tensor, span_id: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the key states of adjacent tokens (FastAdaSP eq. 4); -inf across span borders.

    Args:
        keys: (B, T, Dk) key states, or (B, H, T, d_head) per-head key states (heads are concatenated).
        span_id: (B, T) long, span number of each token; -1 = not reducible. Pairs whose two tokens are not in the
            same span get -inf, so they are never merged.
    """
    if keys.dim() == 4:
        keys = flatten_heads(keys)
    if keys.dim() != 3 or tuple(keys.shape[:2]) != tuple(span_id.shape):
        raise ValueError(
            f"adjacent_similarity expects keys (B, T, Dk) or (B, H, T, d) matching span_id (B, T) = "
            f"{tuple(span_id.shape)}, got {tuple(keys.shape)}."
        )
    keys = keys.float() if keys.dtype in (torch.float16, torch.bfloat16) else keys
    similarity = F.cosine_similarity(keys[:, :-1], keys[:, 1:], dim=-1)  # (B, T-1)
    return similarity.masked_fill(~same_span_pairs(span_id), float("-inf"))


def _descending_rank(similarity: torch.Tensor) -> torch.Tensor:
    """Rank of each pair in its row, 0 = most similar; ties go to the lower index (a strict total order)."""
    order = similarity.sort(dim=1, descending=True, stable=True).indices  # (B, P)
    positions = torch.arange(similarity.shape[1], device=similarity.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)  # (B, P)


def _disjoint_greedy(rank: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Pairs chosen by "greedy by similarity, skip pairs that touch a chosen token", without a budget.

    On a chain of pairs the greedy choice equals repeated rounds of "take every available pair that outranks both
    available neighbours, then retire the neighbours of what was taken". Greedy accepts pairs in rank order, so
    its first k picks are the k best-ranked pairs of the full greedy set. Rounds stop early once every row holds
    ``budget`` picks that outrank all still-available pairs.

    Args:
        rank: (B, P) long, 0 = most similar.
        valid: (B, P) bool, pair may be merged.
        budget: (B,) long, picks needed per row.
    """
    batch, pairs = rank.shape
    worst = pairs  # rank given to unavailable pairs
    chosen = torch.zeros_like(valid)
    available = valid.clone()
    while bool(available.any()):
        key = torch.where(available, rank, torch.full_like(rank, worst))  # (B, P)
        left = F.pad(key, (1, 0), value=worst)[:, :-1]
        right = F.pad(key, (0, 1), value=worst)[:, 1:]
        take = available & (key < left) & (key < right)  # local maxima of similarity
        chosen |= take
        touched = take | F.pad(take, (1, 0))[:, :-1] | F.pad(take, (0, 1))[:, 1:]
        available &= ~touched
        best_left = torch.where(available, rank, torch.full_like(rank, worst)).amin(dim=1)  # (B,)
        settled = (chosen & (rank < best_left.unsqueeze(1))).sum(dim=1)  # (B,)
        if bool((settled >= budget).all()):
            break
    return chosen


def merge_plan(
    similarity: torch.Tensor, weights: torch.Tensor, num_merges: torch.Tensor, chain: bool = True
) -> Plan:
    """Plan a merge of the ``num_merges[b]`` most similar adjacent pairs of each row (FastAdaSP, A.3).

    chain=True (FastAdaSP, avg_merge, random_merge): the top-k pairs are picked; consecutive picked pairs chain
    into one cluster (pairs i, i+1, i+2 merge tokens i..i+3 into one). chain=False (A-ToMe style): chosen pairs
    never share a token; the rule is greedy by similarity: scan pairs from most to least similar (ties: lower
    index first), take a pair unless it touches a token already taken, stop after k. Either way k pairs remove
    exactly k tokens. Pairs with a non-finite similarity (-inf across span borders, NaN) are never picked; a row
    with fewer pickable pairs than asked merges what it can, and ``plan.removed`` says how many it removed.

    Args:
        similarity: (B, T-1) score of each adjacent pair (token i, i+1), e.g. from :func:`adjacent_similarity`.
        weights: (B, T) non-negative merge weight of each token: attention received (FastAdaSP eq. 5) or ones.
        num_merges: (B,) long, pairs to merge per row.
        chain: chain consecutive picked pairs into clusters (True) or pick disjoint pairs only (False).
    """
    if weights.dim() != 2:
        raise ValueError(f"merge_plan expects weights of shape (B, T), got {tuple(weights.shape)}.")
    batch, length = weights.shape
    if tuple(similarity.shape) != (batch, max(length - 1, 0)):
        raise ValueError(
            f"merge_plan expects similarity (B, T-1) = ({batch}, {length - 1}) for weights (B, T) = "
            f"({batch}, {length}), got {tuple(similarity.shape)}; compute it on the same tokens."
        )
    num_merges = torch.as_tensor(num_merges, device=weights.device).long().reshape(-1)
    if num_merges.shape[0] != batch or bool((num_merges < 0).any()):
        raise ValueError(f"num_merges must be (B,) = ({batch},) non-negative counts, got {num_merges.tolist()}.")
    weights = weights if weights.is_floating_point() else weights.float()
    if not bool(((weights >= 0) & (weights < float("inf"))).all()):  # NaN fails both
        raise ValueError("merge weights must be finite and non-negative (attention received, or ones).")

    if length == 0:
        return identity_plan(batch, 0, weights.device)
    valid = torch.isfinite(similarity)  # (B, T-1)
    key = similarity.masked_fill(~valid, float("-inf"))
    if chain:  # the top-k pairs: the first k of the descending order (ties: lower index first)
        order = key.sort(dim=1, descending=True, stable=True).indices  # (B, T-1)
        first_k = torch.arange(key.shape[1], device=key.device).unsqueeze(0) < num_merges.unsqueeze(1)
        selected = torch.zeros_like(valid).scatter_(1, order, first_k) & valid  # (B, T-1)
    else:
        rank = _descending_rank(key)
        chosen = _disjoint_greedy(rank, valid, num_merges)
        chosen_rank = torch.where(chosen, rank, torch.full_like(rank, rank.shape[1]))
        selected = chosen & (_descending_rank(-chosen_rank.float()) < num_merges.unsqueeze(1))
    shortfall = num_merges - selected.sum(dim=1)
    if bool((shortfall > 0).any()):
        _warn_once(
            "merge_shortfall",
            "some rows have fewer mergeable adjacent pairs than requested (span too short); they merge what they "
            "can and plan.removed reports it.",
        )
        logger.debug("merge shortfall per row: %s", shortfall.tolist())
    # Token j joins token j-1's slot when pair (j-1, j) is selected.
    starts = ~F.pad(selected, (1, 0), value=False)  # (B, T)
    return plan_from_slots(starts, None, weights)  # every token kept, alone or merged
