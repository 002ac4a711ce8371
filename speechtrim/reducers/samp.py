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

import torch
import torch.nn.functional as F

from speechtrim.ops.plan import Plan, plan_from_slots
from speechtrim.ops.select import count_to_remove_int
from speechtrim.reducers.base import REDUCERS
from speechtrim.reducers.pre_llm import PreLLMReducer, attention_received
from speechtrim.reduction import LayerStep


def similarity_groups(unit: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy left-to-right grouping of unit vectors (n, D): (n,) bool "opens a group", (n,) similarity with which
    each token joined its group (+inf for group openers)."""
    count = unit.shape[0]
    opens = torch.ones(count, dtype=torch.bool)
    joined = torch.full((count,), float("inf"))
    total, size = unit[0].clone(), 1
    for index in range(1, count):
        similarity = float(total @ unit[index]) / size  # mean cosine to the group's members
        if similarity >= threshold:
            opens[index], joined[index] = False, similarity
            total += unit[index]
            size += 1
        else:
            total, size = unit[index].clone(), 1
    return opens, joined


def greedy_dpp(kernel: torch.Tensor, count: int) -> list[int]:
    """Indices (time order) of ``count`` items chosen by fast greedy MAP inference of a DPP (Chen et al., 2018)."""
    size = kernel.shape[0]
    gains = kernel.diagonal().clone()  # (M,): marginal log-det gain of each item
    rows = torch.zeros(count, size, dtype=kernel.dtype)
    available = torch.ones(size, dtype=torch.bool)
    chosen: list[int] = []
    for step in range(count):
        usable = available & torch.isfinite(gains)
        # once every gain is used up (near-duplicates), the rest go in order of their remaining gain, then index
        best = int(torch.where(usable, gains, torch.full_like(gains, float("-inf"))).argmax()) if usable.any() \
            else int(available.nonzero()[0])
        chosen.append(best)
        available[best] = False
        if step + 1 == count:
            break
        row = (kernel[best] - rows[:step].T @ rows[:step, best]) / gains[best].clamp(min=1e-12).sqrt()
        rows[step] = row
        gains = gains - row**2
    return sorted(chosen)


@REDUCERS.register("samp")
@dataclass
class Samp(PreLLMReducer):
    """Merge runs of similar adjacent audio tokens, then keep a diverse, relevant subset (DPP).

    Args:
        threshold: mean cosine similarity for a token to join the open group (0.85, the release's default).
    """

    threshold: float = 0.85

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        super().__post_init__()

    def plan(self, step: LayerStep) -> Plan:
        span_id = step.span_id
        received, own = attention_received(step.hidden.detach(), span_id)  # (B, T) each
        starts = torch.ones_like(span_id, dtype=torch.bool)
        keep = torch.ones_like(span_id, dtype=torch.bool)
        positions = torch.arange(span_id.shape[1])
        for row in range(span_id.shape[0]):
            for span in sorted(set(span_id[row].tolist()) - {-1}):
                members = positions[span_id[row].cpu() == span]
                opens, groups_kept = self._span(step.hidden[row, members].detach().float().cpu(),
                                                received[row, members].cpu(), own[row, members].cpu(), step.ratio)
                starts[row, members] = opens.to(starts.device)
                keep[row, members] = groups_kept.to(keep.device)
        return plan_from_slots(starts, keep, torch.where(span_id >= 0, received, torch.ones_like(received)))

    def _span(self, hidden: torch.Tensor, received: torch.Tensor, own: torch.Tensor,
              ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One span: (n,) bool "opens a group" and (n,) bool "its group is kept"."""
        count = hidden.shape[0]
        target = count - count_to_remove_int(count, ratio)
        unit = F.normalize(hidden, dim=-1)
        opens, joined = similarity_groups(unit, self.threshold)
        shortfall = target - int(opens.sum())
        if shortfall > 0:  # too few groups: undo the weakest joins
            opens[joined.argsort(stable=True)[:shortfall]] = True
        group = opens.long().cumsum(0) - 1  # (n,)
        groups = int(group[-1]) + 1
        weight = received.clamp(min=1e-12)
        merged = torch.zeros(groups, hidden.shape[1]).index_add_(0, group, hidden * weight.unsqueeze(1))
        merged = merged / torch.zeros(groups).index_add_(0, group, weight).unsqueeze(1)
        relevance = torch.zeros(groups).index_add_(0, group, own) / torch.bincount(group, minlength=groups)
        kept_groups = torch.ones(groups, dtype=torch.bool)
        if groups > target:
            unit_merged = F.normalize(merged, dim=-1)
            kernel = relevance.unsqueeze(1) * (unit_merged @ unit_merged.T) * relevance.unsqueeze(0)
            kept_groups = torch.zeros(groups, dtype=torch.bool)
            kept_groups[greedy_dpp(kernel.double(), target)] = True
        return opens, kept_groups[group]


__all__ = ["Samp", "greedy_dpp", "similarity_groups"]
