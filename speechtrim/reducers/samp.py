"""``samp``: SA-MAP's merge-then-prune of the audio embeddings before the LLM (Samp, Tencent AngelSlim, 2026).

Per audio span, as the Samp release does it:
1. Merge: one left-to-right pass groups adjacent tokens; token i+1 joins the open group G while its mean cosine
   similarity to G's members, mean_g cos(x_g, x_i+1), is at least ``threshold`` (0.85). A group becomes the mean of
   its members weighted by the attention they receive, m_g; its relevance is the mean of their self-attention u_g.
2. Prune: fast greedy MAP inference of a determinantal point process over the M groups with kernel
   K = diag(r) C diag(r) (C: cosine similarity of the merged vectors) keeps the T most relevant and diverse ones, in
   time order.
T = n - count_to_remove(n, ratio): a function of the length and the ratio only. When the merge leaves fewer than T
groups, the joins of lowest similarity are undone until exactly T remain (as the release's Kimi-Audio port does).
The release reads the attention of the audio encoder's last layer; before the LLM, on any model, m and u come from a
parameter-free self-attention of the span's embeddings (:func:`speechtrim.reducers.pre_llm.attention_received`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speechtrim.ops.plan import Plan, plan_from_slots
from speechtrim.ops.select import count_to_remove_int, span_lengths
from speechtrim.reducers.base import REDUCERS
from speechtrim.reducers.pre_llm import PreLLMReducer, attention_received
from speechtrim.reduction import LayerStep, ModelShape


def similarity_groups(unit: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy left-to-right grouping of unit vectors (n, D): (n,) bool "opens a group", (n,) similarity with which
    each token joined its group (+inf for group openers). NumPy: one short dot product per token."""
    count = unit.shape[0]
    opens = np.ones(count, dtype=bool)
    joined = np.full(count, np.inf)
    total, size = unit[0].copy(), 1
    for index in range(1, count):
        similarity = float(total @ unit[index]) / size  # mean cosine to the group's members
        if similarity >= threshold:
            opens[index], joined[index] = False, similarity
            total += unit[index]
            size += 1
        else:
            total, size = unit[index].copy(), 1
    return opens, joined


def greedy_dpp(kernel: np.ndarray, count: int) -> list[int]:
    """Indices (time order) of ``count`` items chosen by fast greedy MAP inference of a DPP (Chen et al., 2018)."""
    size = kernel.shape[0]
    gains = kernel.diagonal().astype(np.float64).copy()  # (M,): marginal log-det gain of each item
    rows = np.zeros((size, count))  # column t: the Cholesky row of the t-th pick, for every item
    available = np.ones(size, dtype=bool)
    chosen: list[int] = []
    for step in range(count):
        usable = available & np.isfinite(gains)
        # once every gain is used up (near-duplicates), the rest go in order of their remaining gain, then index
        best = int(np.argmax(np.where(usable, gains, -np.inf))) if usable.any() else int(np.flatnonzero(available)[0])
        chosen.append(best)
        available[best] = False
        if step + 1 == count:
            break
        row = (kernel[best] - rows[:, :step] @ rows[best, :step]) / np.sqrt(max(gains[best], 1e-12))
        rows[:, step] = row
        gains -= row**2
    return sorted(chosen)


@REDUCERS.register("samp")
@dataclass
class Samp(PreLLMReducer):
    """Merge runs of similar adjacent audio tokens, then keep a diverse, relevant subset (DPP).

    Args:
        threshold: mean cosine similarity for a token to join the open group (0.85, the release's default).
        window: a span longer than this is reduced in consecutive windows of this many tokens, each keeping its own
            share (375: 30 s at 12.5 tokens per second, the release's longest input); the greedy DPP costs
            O(n * kept^2), so a 240 s clip in one piece would take minutes.
    """

    threshold: float = 0.85
    window: int = 375

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2 tokens, got {self.window!r}")
        super().__post_init__()

    def _removals(self, length: int, ratio: float) -> int:
        """Tokens a span of ``length`` loses: ``count_to_remove`` of each of its windows."""
        return sum(count_to_remove_int(min(self.window, length - start), ratio)
                   for start in range(0, length, self.window))

    def output_length(self, audio_tokens: int, text_tokens: int = 0, shape: ModelShape | None = None) -> int:
        """Audio tokens emitted for a clip of ``audio_tokens``, summed over its windows (a function of the length
        and the ratio only)."""
        return audio_tokens - self._removals(audio_tokens, self.embedding_ratio(audio_tokens, text_tokens, shape))

    def removal_counts(self, span_id: torch.Tensor, ratio: float) -> torch.Tensor:
        """(B,) tokens removed per row: per span, per window, ``count_to_remove(window length, ratio)``."""
        removed = [sum(self._removals(length, ratio) for length in row) for row in span_lengths(span_id).tolist()]
        return torch.tensor(removed, dtype=torch.long, device=span_id.device)

    def plan(self, step: LayerStep) -> Plan:
        span_id = step.span_id
        starts = torch.ones_like(span_id, dtype=torch.bool)
        keep = torch.ones_like(span_id, dtype=torch.bool)
        weight = torch.ones(span_id.shape, dtype=torch.float32)
        positions = torch.arange(span_id.shape[1])
        ids = span_id.cpu()
        for row in range(span_id.shape[0]):
            for span in sorted(set(ids[row].tolist()) - {-1}):
                members_all = positions[ids[row] == span]
                for start in range(0, len(members_all), self.window):
                    members = members_all[start : start + self.window]
                    vectors = step.hidden[row, members].detach().float().cpu()  # (w, D)
                    received, own = attention_received(vectors.unsqueeze(0), torch.zeros(1, len(members),
                                                                                          dtype=torch.long))
                    opens, groups_kept = self._span(vectors, received[0], own[0], step.ratio)
                    starts[row, members], keep[row, members] = opens, groups_kept
                    weight[row, members] = received[0]
        device = span_id.device
        return plan_from_slots(starts.to(device), keep.to(device), weight.to(device))

    def _span(self, hidden: torch.Tensor, received: torch.Tensor, own: torch.Tensor,
              ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One span: (n,) bool "opens a group" and (n,) bool "its group is kept"."""
        count = hidden.shape[0]
        target = count - count_to_remove_int(count, ratio)
        vectors = hidden.double().numpy()
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        opens, joined = similarity_groups(unit, self.threshold)
        shortfall = target - int(opens.sum())
        if shortfall > 0:  # too few groups: undo the weakest joins
            opens[np.argsort(joined, kind="stable")[:shortfall]] = True
        group = np.cumsum(opens) - 1  # (n,)
        groups = int(group[-1]) + 1
        weight = np.maximum(received.double().numpy(), 1e-12)
        merged = np.zeros((groups, vectors.shape[1]))
        np.add.at(merged, group, vectors * weight[:, None])
        merged /= np.bincount(group, weights=weight, minlength=groups)[:, None]
        relevance = np.bincount(group, weights=own.double().numpy(), minlength=groups) / np.bincount(group)
        kept_groups = np.ones(groups, dtype=bool)
        if groups > target:
            unit_merged = merged / np.maximum(np.linalg.norm(merged, axis=1, keepdims=True), 1e-12)
            kernel = relevance[:, None] * (unit_merged @ unit_merged.T) * relevance[None, :]
            kept_groups = np.zeros(groups, dtype=bool)
            kept_groups[greedy_dpp(kernel, target)] = True
        return torch.from_numpy(opens), torch.from_numpy(kept_groups[group])


__all__ = ["Samp", "greedy_dpp", "similarity_groups"]
