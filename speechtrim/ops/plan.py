"""A reduction plan: how one decoder layer shrinks a (B, T) sequence to (B, T_new), and how to apply it.

Every reducer (merge or eviction) produces a :class:`Plan`; the Hugging Face plumbing applies it to the hidden
states with :func:`apply_plan` and to position ids, rotary tables and mask rows/columns with :func:`gather_time`;
:func:`compose_plans` chains the plans of successive layers back to the original sequence.

Conventions:
- Surviving tokens keep their order: ``slot`` is non-decreasing in the old index among kept tokens.
- Rows of a batch may shrink by different amounts. All rows get ``T_new = T - min(removed)`` slots; a row that
  removed more gets filler slots at the LEFT (batches are left-padded), so fillers are extra left padding.
  A filler's ``source`` is the row's first old index (0), so gathered position ids / rotary tables stay finite;
  the caller must mask filler columns out of attention.
- The ``source`` of a merged slot is the member with the largest merge weight (ties: the earliest member). Its
  position id, rotary embedding and mask column stand for the whole cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22  # apply_plan processes merged tokens in chunks of at most this many values (16 MB fp32)
# apply_plan takes the short path up to this many hidden values (455 tokens of SmolLM2's 576 channels at batch 1)
_SMALL_ELEMENTS = 1 << 18


@dataclass
class Plan:
    """How one decoder layer shrinks a (B, T) sequence to (B, T_new).

    Args:
        slot: (B, T) long, new index of each old token; -1 = evicted.
        weight: (B, T) float, merge weight of each old token (0 where evicted).
        source: (B, T_new) long, old index whose position id / rotary embedding / mask column the new token takes.
        filler: (B, T_new) bool, True for slots added only to align rows of different lengths (mask them out).
        removed: (B,) long, tokens removed in each row.
    """

    slot: torch.Tensor
    weight: torch.Tensor
    source: torch.Tensor
    filler: torch.Tensor
    removed: torch.Tensor

    @property
    def new_length(self) -> int:
        """Number of slots per row after the plan (T_new)."""
        return int(self.source.shape[1])

    @property
    def batch(self) -> int:
        """Batch size B."""
        return int(self.slot.shape[0])

    @property
    def old_length(self) -> int:
        """Number of tokens per row before the plan (T)."""
        return int(self.slot.shape[1])


def identity_plan(batch: int, length: int, device: torch.device | str | None = None) -> Plan:
    """A plan that keeps every token in place (ratio 0).

    Args:
        batch: batch size B.
        length: sequence length T.
        device: device of the plan tensors.
    """
    index = torch.arange(length, device=device).unsqueeze(0).expand(batch, length).clone()  # (B, T)
    return Plan(
        slot=index,
        weight=torch.ones(batch, length, device=device),
        source=index.clone(),
        filler=torch.zeros(batch, length, dtype=torch.bool, device=device),
        removed=torch.zeros(batch, dtype=torch.long, device=device),
    )


def plan_from_slots(starts: torch.Tensor, keep: torch.Tensor | None, weight: torch.Tensor) -> Plan:
    """Build a left-aligned :class:`Plan` from per-token "opens a new slot" and "kept" masks.

    A kept token with ``starts`` False joins the slot of the previous kept token (a merge cluster); a token with
    ``keep`` False is evicted. Shared by the merge and eviction ops.

    Args:
        starts: (B, T) bool, token opens a new slot (must be True for the first kept token of each row).
        keep: (B, T) bool, token survives (alone or merged); None: every token does (a merge plan, fewer
            operators).
        weight: (B, T) float, non-negative merge weight of each token.
    """
    batch, length = starts.shape
    device = starts.device
    opens = starts if keep is None else starts & keep  # (B, T)
    slot = opens.long().cumsum(dim=1) - 1  # (B, T): compact slot ids, row-local
    kept_slots = opens.sum(dim=1)  # (B,)
    removed = length - kept_slots  # (B,)
    if batch == 0:
        new_length = length
    else:
        new_length = int(kept_slots.max())
    shift = new_length - kept_slots  # (B,): filler slots on the left of each row
    if keep is None:
        slot = slot + shift.unsqueeze(1)  # (B, T)
        target = slot
    else:
        slot = torch.where(keep, slot + shift.unsqueeze(1), torch.full_like(slot, -1))  # (B, T)
        weight = torch.where(keep, weight, torch.zeros_like(weight))  # (B, T)
        target = torch.where(keep, slot, torch.full_like(slot, new_length))  # (B, T): evicted -> a discarded slot

    # Source of each slot: the member with the largest weight, ties to the earliest member.
    best = torch.full((batch, new_length + 1), -1.0, dtype=weight.dtype, device=device)
    best = best.scatter_reduce(1, target, weight, reduce="amax", include_self=True)  # (B, T_new + 1)
    old_index = torch.arange(length, device=device).unsqueeze(0).expand(batch, length)  # (B, T)
    is_best = weight == best.gather(1, target)
    if keep is not None:
        is_best &= keep
    candidate = torch.where(is_best, old_index, torch.full_like(old_index, length))  # (B, T)
    source = torch.full((batch, new_length + 1), length, dtype=torch.long, device=device)
    source = source.scatter_reduce(1, target, candidate, reduce="amin", include_self=True)[:, :new_length]
    filler = torch.arange(new_length, device=device).unsqueeze(0) < shift.unsqueeze(1)  # (B, T_new)
    source = torch.where(filler, torch.zeros_like(source), source)  # (B, T_new)
    return Plan(slot=slot, weight=weight, source=source, filler=filler, removed=removed)


def eviction_plan(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> Plan:
    """The left-aligned :class:`Plan` that keeps the ``keep`` tokens of each row in order and evicts the rest:
    ``plan_from_slots(keep, keep, ones)`` built directly (no merge clusters to resolve, a fraction of the ops).

    Args:
        keep: (B, T) bool, token survives.
        dtype: dtype of the plan's weights.
    """
    batch, length = keep.shape
    device = keep.device
    kept = keep.sum(dim=1)  # (B,)
    new_length = int(kept.max()) if batch else length
    shift = new_length - kept  # (B,): filler slots on the left of each row
    slot = torch.where(keep, keep.cumsum(dim=1) - 1 + shift.unsqueeze(1), -1)  # (B, T)
    in_order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # kept tokens first, in order
    columns = torch.arange(new_length, device=device).unsqueeze(0)  # (1, T_new)
    filler = columns < shift.unsqueeze(1)  # (B, T_new)
    source = in_order.gather(1, (columns - shift.unsqueeze(1)).clamp(min=0)).masked_fill_(filler, 0)  # (B, T_new)
    return Plan(slot=slot, weight=keep.to(dtype), source=source, filler=filler, removed=length - kept)


def plan_rows(plan: Plan, start: int, stop: int) -> Plan:
    """The plan of rows ``start:stop`` of a batched plan (views, no copies): one layer's part of a plan that was built
    for several layers' cache steps stacked as rows.

    Args:
        plan: a plan over B rows.
        start: first row.
        stop: one past the last row.
    """
    return Plan(slot=plan.slot[start:stop], weight=plan.weight[start:stop], source=plan.source[start:stop],
                filler=plan.filler[start:stop], removed=plan.removed[start:stop])


def compose_plans(first: Plan | None, second: Plan) -> Plan:
    """The plan that applies ``first`` then ``second``, expressed on ``first``'s original (B, T0) sequence.

    ``slot`` maps each original token to its final slot (-1 once either plan evicts it), with weight 1 for every
    survivor; ``source`` points through both plans back to an original index; a slot is a filler when ``second``
    added it or when it takes a filler of ``first``. The decoder's full-length position ids, rotary tables and mask
    are re-indexed with this plan at every later layer.

    Args:
        first: the plan accumulated so far, original (B, T0) -> (B, T1); None = nothing reduced yet.
        second: the next plan, (B, T1) -> (B, T2).
    """
    if first is None:
        return second
    slot = torch.where(
        first.slot >= 0, second.slot.gather(1, first.slot.clamp(min=0)), torch.full_like(first.slot, -1)
    )  # (B, T0)
    return Plan(
        slot=slot,
        weight=(slot >= 0).to(first.weight.dtype),
        source=first.source.gather(1, second.source),  # (B, T2)
        filler=second.filler | first.filler.gather(1, second.source),  # (B, T2)
        removed=first.removed + second.removed,
    )


def apply_plan(plan: Plan, hidden: torch.Tensor) -> torch.Tensor:
    """Shrink hidden states with a plan: each slot is the weighted mean of its members (FastAdaSP eq. 6).

    A slot whose members all have weight 0 takes their plain mean; filler slots get a copy of their source token,
    so every output value is finite. Half-precision inputs are accumulated in float32 and cast back.

    Args:
        plan: the reduction plan, for B rows of T tokens.
        hidden: (B, T, D) hidden states.
    """
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (plan.batch, plan.old_length):
        raise ValueError(
            f"apply_plan expects hidden states of shape (B, T, D) = ({plan.batch}, {plan.old_length}, D), "
            f"got {tuple(hidden.shape)}; build the plan from the same batch."
        )
    batch, length, width = hidden.shape
    new_length = plan.new_length
    compute_dtype = hidden.dtype if hidden.dtype in (torch.float32, torch.float64) else torch.float32
    if hidden.numel() <= _SMALL_ELEMENTS:
        return _apply_small(plan, hidden, compute_dtype)
    kept = plan.slot >= 0  # (B, T)
    target = torch.where(kept, plan.slot, torch.full_like(plan.slot, new_length))  # (B, T), dump slot T_new
    weight = plan.weight.to(compute_dtype)  # (B, T)
    total = torch.zeros(batch, new_length + 1, dtype=compute_dtype, device=hidden.device)
    total = total.scatter_add(1, target, weight)  # (B, T_new + 1)
    members = torch.zeros_like(total).scatter_add(1, target, kept.to(compute_dtype))  # (B, T_new + 1)
    empty_weight = (total <= 0).gather(1, target)  # (B, T): the slot's weights sum to 0 -> plain mean
    norm_weight = torch.where(
        empty_weight,
        1.0 / members.clamp_min(1).gather(1, target),
        weight / total.clamp_min(torch.finfo(compute_dtype).tiny).gather(1, target),
    )
    norm_weight = torch.where(kept, norm_weight, torch.zeros_like(norm_weight))  # (B, T)

    # Gather the first member of every slot (fillers: their source), scale it, then add the other members of the
    # multi-token slots. Only merged tokens go through index_add_, which keeps memory traffic near one copy.
    old_index = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, length)  # (B, T)
    first = torch.full((batch, new_length + 1), length, dtype=torch.long, device=hidden.device)
    first = first.scatter_reduce(1, target, old_index, reduce="amin", include_self=True)[:, :new_length]
    first = torch.where(plan.filler, plan.source, first)  # (B, T_new)
    first_weight = torch.where(plan.filler, torch.ones_like(total[:, :new_length]), norm_weight.gather(1, first))
    flat_hidden = hidden.reshape(batch * length, width)  # (B * T, D)
    row_base = torch.arange(batch, device=hidden.device).unsqueeze(1)  # (B, 1)
    out = flat_hidden.index_select(0, (first + row_base * length).reshape(-1)).to(compute_dtype)  # (B * T_new, D)
    if not bool((first_weight == 1).all()):
        out.mul_(first_weight.reshape(-1, 1))
    is_first = kept & (first.gather(1, target.clamp_max(new_length - 1)) == old_index) if new_length else kept
    others = (kept & ~is_first).reshape(-1).nonzero().squeeze(1)  # (N_merged,) flat old indices
    destination = (plan.slot + row_base * new_length).reshape(-1).index_select(0, others)  # (N_merged,)
    other_weight = norm_weight.reshape(-1, 1)[others]  # (N_merged, 1)
    chunk = max(1, _CHUNK_ELEMENTS // max(width, 1))  # bounded temporaries (and heap reuse on CPU)
    for begin in range(0, others.numel(), chunk):  # a loop over chunks of merged tokens, not over tokens
        part = slice(begin, begin + chunk)
        merged = flat_hidden.index_select(0, others[part]).to(compute_dtype)  # (chunk, D), a fresh tensor
        out.index_add_(0, destination[part], merged.mul_(other_weight[part]))
    return out.view(batch, new_length, width).to(hidden.dtype)  # (B, T_new, D)


def _apply_small(plan: Plan, hidden: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """``apply_plan`` of a short sequence in a third of the operators: every token, scaled by its normalised weight,
    is added into its slot (at this size the operators' count is the cost, not the extra pass over the tokens that
    the long path avoids). The same sums in the same order: the same values."""
    batch, length, width = hidden.shape
    new_length = plan.new_length
    kept = plan.slot >= 0  # (B, T)
    target = plan.slot.masked_fill(~kept, new_length)  # (B, T), evicted -> a discarded slot T_new
    weight = plan.weight.to(compute_dtype)  # (B, T)
    total = torch.zeros(batch, new_length + 1, dtype=compute_dtype, device=hidden.device)
    total = total.scatter_add_(1, target, weight).gather(1, target)  # (B, T): weight of each token's slot
    members = torch.zeros(batch, new_length + 1, dtype=compute_dtype, device=hidden.device)
    members = members.scatter_add_(1, target, kept.to(compute_dtype)).gather(1, target)  # (B, T)
    norm_weight = torch.where(total > 0, weight / total.clamp_min(torch.finfo(compute_dtype).tiny),
                              1.0 / members.clamp_min(1))  # a slot whose weights sum to 0: plain mean
    norm_weight = norm_weight.masked_fill_(~kept, 0.0)  # (B, T)
    rows = target + torch.arange(batch, device=hidden.device).unsqueeze(1) * (new_length + 1)  # (B, T)
    scaled = hidden.to(compute_dtype) * norm_weight.unsqueeze(2)  # (B, T, D)
    out = torch.zeros(batch * (new_length + 1), width, dtype=compute_dtype, device=hidden.device)
    out = out.index_add_(0, rows.reshape(-1), scaled.reshape(-1, width)).view(batch, new_length + 1, width)
    out = out[:, :new_length]  # (B, T_new, D)
    if bool(plan.filler.any()):  # filler slots have no members: a copy of their source token
        index = plan.source.unsqueeze(2).expand(batch, new_length, width)
        out = torch.where(plan.filler.unsqueeze(2), hidden.gather(1, index).to(compute_dtype), out)
    return out.to(hidden.dtype).contiguous()


def gather_time(plan: Plan, tensor: torch.Tensor, dim: int, batch_dim: int | None = None) -> torch.Tensor:
    """Index a tensor's time axis with ``plan.source``, row by row, broadcasting over its other axes.

    Used for position ids (B, T) or M-RoPE (3, B, T), rotary tables (B, T, d) and mask rows/columns
    (B, 1, Tq, Tk). A batch axis of size 1 is broadcast to B.

    Args:
        plan: the reduction plan (source is (B, T_new)).
        tensor: any tensor with a time axis of size T and a batch axis of size B or 1.
        dim: the time axis.
        batch_dim: the batch axis. None infers it: axis 1 for integer (3, B, T) tensors (M-RoPE position ids, any
            B); otherwise axis 0 when its size is B or 1, else axis 1. Pass it explicitly for float M-RoPE tables
            (3, B, T, d) when B may be 3, where the shape alone cannot tell.
    """
    ndim = tensor.dim()
    dim = dim % ndim if -ndim <= dim < ndim else dim
    if not 0 <= dim < ndim or tensor.shape[dim] != plan.old_length:
        raise ValueError(
            f"gather_time: axis {dim} of a tensor of shape {tuple(tensor.shape)} must be the time axis of size "
            f"{plan.old_length}; pass dim= the axis that holds the sequence."
        )
    batch = plan.batch
    if batch == 1 and dim == 1 and tensor.shape[0] == 1 and batch_dim in (None, 0):
        return tensor.index_select(1, plan.source[0])  # one row, (1, T, *rest): whole entries copied
    mrope_ids = ndim == 3 and dim == 2 and tensor.shape[0] == 3 and not tensor.is_floating_point()
    if batch_dim is None and mrope_ids and tensor.dtype != torch.bool and tensor.shape[1] in (batch, 1):
        batch_dim = 1
    if batch_dim is None:
        candidates = [axis for axis in (0, 1) if axis < ndim and axis != dim and tensor.shape[axis] in (batch, 1)]
        if not candidates:
            raise ValueError(
                f"gather_time: no batch axis of size {batch} or 1 among axes 0-1 of shape {tuple(tensor.shape)}; "
                "pass batch_dim= explicitly."
            )
        batch_dim = candidates[0]
    batch_dim = batch_dim % ndim
    if batch_dim == dim or tensor.shape[batch_dim] not in (batch, 1):
        raise ValueError(
            f"gather_time: batch_dim={batch_dim} of shape {tuple(tensor.shape)} must differ from dim={dim} and have "
            f"size {batch} or 1."
        )
    # Move (batch, time) to the front, gather, move back.
    moved = tensor.movedim((batch_dim, dim), (0, 1))  # (B or 1, T, *rest)
    rest = moved.shape[2:]
    moved = moved.expand(batch, plan.old_length, *rest)
    index = plan.source.view(batch, plan.new_length, *([1] * len(rest))).expand(batch, plan.new_length, *rest)
    gathered = moved.gather(1, index)  # (B, T_new, *rest)
    return gathered.movedim((0, 1), (batch_dim, dim))
