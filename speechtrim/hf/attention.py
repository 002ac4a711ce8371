"""A registered attention backend that is stock SDPA plus, on request, the attention each key receives.

FastAdaSP (Lu et al., EMNLP 2024 Industry, sec. 3.2) needs two things from a decoder layer's attention during prefill:
- eq. 4: the layer's key states, for the cosine similarity of adjacent audio tokens;
- eq. 5: the attention each key column receives, summed over heads and over all prompt queries
  (FastV and H2O use the same column sums).

When scores are available. A decision at layer ``i`` is taken in layer ``i``'s forward *pre*-hook, before layer
``i``'s attention runs, so it reads the scores and keys recorded by layer ``i - 1``'s attention. Layer ``i - 1``
ran on exactly the tokens that enter layer ``i`` (a plan at ``i - 1`` is applied before its attention), so the
columns line up with ``hidden_states`` and ``span_id`` of layer ``i``. Layer 0 has no earlier attention: its
decision gets ``None``. This is the FastV convention (prune at layer K with layer K-1's attention); FastAdaSP's
reference merges right after layer ``i``'s attention block, i.e. our layer ``i + 1`` pre-hook, with the MLP of
layer ``i`` in between.

How the tap travels. The attachment puts a :class:`AttentionTap` in the decoder layer's keyword arguments as
``speechtrim_tap``; transformers passes unknown keyword arguments down to the attention function, which pops it.
Without a tap the backend is the stock SDPA function called with the same arguments (bit-identical logits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

BACKEND_NAME = "speechtrim_sdpa"
TAP_KWARG = "speechtrim_tap"
# Bound on each float32 (B, H, block, T_kv) buffer of a block (the logits, then the probabilities): 32 MB keeps the
# tapped layer's transient memory near an ordinary layer's at large batches (at 256 MB, 240 s of audio and batch 4,
# the scoring layer's peak was 1.6x an ordinary layer's) and still allows the full 64 rows up to batch 4, 3,000 keys.
_SCORE_BLOCK_BYTES = 32 * 1024 * 1024
# Most query rows per block: small blocks stay in cache. At 3,000 tokens on CPU (SmolLM2-135M's 9 heads, 2 threads)
# 256 rows ran 6x faster than 2,466, and 32-128 rows 1.2-1.3x faster than 256 (scripts/score_blocks.py: 1.45-1.57x
# SDPA's time against 1.93x); between 32 and 128 the order changed from run to run.
_SCORE_BLOCK_ROWS = 64


@dataclass
class AttentionTap:
    """Asks one layer's attention, during prefill, to record its key states and per-key attention sums.

    Args:
        query_valid: (B, T) bool, queries that count in the sum (False for padding and filler slots); None = all.
        scores: filled by the backend: (B, T_kv) float32, attention each key column receives, summed over heads and
            valid queries (FastAdaSP eq. 5).
        keys: filled by the backend when ``keep_keys``: (B, H_kv, T_kv, head_dim), the layer's key states after
            rotary embedding (what the KV cache stores), before GQA repetition (FastAdaSP eq. 4 input).
        keep_scores: compute ``scores`` (False for a method that reads only the keys, e.g. A-ToMe: the per-key
            attention sums are the expensive part of a tap).
        keep_keys: record ``keys``. False for KV-cache evictors, so the tap holds no reference to the full cache
            tensors and eviction really frees them.
    """

    query_valid: torch.Tensor | None = None
    keep_scores: bool = True
    keep_keys: bool = True
    scores: torch.Tensor | None = field(default=None, repr=False)
    keys: torch.Tensor | None = field(default=None, repr=False)


def _within_causal(mask: torch.Tensor, offset: int, rows: int = _SCORE_BLOCK_ROWS) -> bool:
    """Whether a bool (B or 1, 1, T_q, T_kv) mask allows no key after its query (lower-right alignment); checked
    ``rows`` query rows at a time, so no (B, 1, T_q, T_kv) copy is made."""
    q_length, kv_length = mask.shape[-2:]
    for start in range(0, q_length, rows):
        stop = min(q_length, start + rows)
        first = start + offset  # the diagonal key of the block's first query
        if stop + offset < kv_length and bool(mask[..., start:stop, stop + offset :].any()):
            return False  # a key later than every query of the block
        if bool(torch.triu(mask[..., start:stop, max(first, 0) : stop + offset], diagonal=1 + min(first, 0)).any()):
            return False
    return True


def key_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    query_valid: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention each key column receives, summed over heads and valid queries: (B, T_kv) float32.

    FastAdaSP eq. 5 / FastV / H2O. Computed in float32, in blocks of queries so memory stays bounded; rows whose keys
    are all masked contribute 0. Under a causal mask (None, or a bool mask that allows no later key) a block of
    queries is scored against the keys up to its last query only, half the work of the full square. The query heads
    that share a key head (GQA) are scored against it together, so keys and values are never repeated per head.

    Args:
        query: (B, H, T_q, d) query states after rotary embedding.
        key: (B, H_kv, T_kv, d) key states after rotary embedding.
        attention_mask: (B or 1, 1, T_q, T_kv) bool (True = attend) or additive float mask; None = causal
            (lower-right aligned).
        scaling: softmax scale; None = d ** -0.5.
        query_valid: (B, T_q) bool, queries to sum over; None = all.
        value: (B, H_kv, T_kv, d) value states: also return the attention output (B, H, T_q, d) float32 computed from
            the same probabilities, so a tapped layer runs its attention once instead of SDPA plus a second pass.
    """
    batch, heads, q_length, width = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads  # query head h reads key head h // groups (transformers' repeat_kv)
    scale = scaling if scaling is not None else width**-0.5
    if (attention_mask is None and kv_length == q_length and q_length <= 2 * _SCORE_BLOCK_ROWS
            and batch * heads * q_length * kv_length * 4 <= _SCORE_BLOCK_BYTES):
        return _one_block_causal(query, key, value, scale, query_valid)
    keys = key.float()  # (B, H_kv, T_kv, d), no copy when float32 already
    values = value.float() if value is not None else None
    weights = query_valid.to(torch.float32) if query_valid is not None else None  # (B, T_q)
    offset = kv_length - q_length  # causal alignment, lower-right (0 in prefill)
    is_bool = attention_mask is not None and attention_mask.dtype == torch.bool
    causal = attention_mask is None or (is_bool and _within_causal(attention_mask, offset))
    block = max(1, min(_SCORE_BLOCK_ROWS, _SCORE_BLOCK_BYTES // max(1, batch * heads * kv_length * 4)))
    scores = torch.zeros(batch, kv_length, dtype=torch.float32, device=query.device)
    output = (torch.empty(batch, kv_heads, groups, q_length, width, dtype=torch.float32, device=query.device)
              if values is not None else None)
    later = (torch.ones(block, block, dtype=torch.bool, device=query.device).triu_(1)
             if attention_mask is None else None)  # a block's keys after its own queries
    for start in range(0, q_length, block):
        stop = min(q_length, start + block)
        rows = stop - start
        end = stop + offset if causal else kv_length  # keys any query of this block may see
        grouped = query[:, :, start:stop].float().reshape(batch, kv_heads, groups * rows, width) * scale
        logits = torch.matmul(grouped, keys[:, :, :end].transpose(2, 3))  # (B, H_kv, G * b, end)
        view = logits.view(batch, kv_heads, groups, rows, end)
        if attention_mask is None:  # only the block's own triangle is masked
            view[..., start + offset : end].masked_fill_(later[:rows, :rows], float("-inf"))
        elif is_bool:
            view.masked_fill_(~attention_mask[:, :, None, start:stop, :end], float("-inf"))
        else:
            view += attention_mask[:, :, None, start:stop, :end].float()
        probs = torch.softmax(logits, dim=-1)  # (B, H_kv, G * b, end)
        if (offset < 0 if attention_mask is None else  # a query that may see no key (padding): its NaN row -> 0
                not is_bool or not bool(attention_mask[:, :, start:stop, :end].any(dim=-1).all())):
            probs.nan_to_num_(0.0)
        del logits, view
        if output is not None:
            output[:, :, :, start:stop] = torch.matmul(probs, values[:, :, :end]).view(batch, kv_heads, groups,
                                                                                         rows, width)
        if weights is None:
            scores[:, :end] += probs.sum(dim=(1, 2))
        else:  # rows of ``probs`` run group-major: the block's query weights once per group
            row_weights = weights[:, start:stop].repeat(1, groups)[:, None, None]  # (B, 1, 1, G * b)
            scores[:, :end] += torch.matmul(row_weights, probs).sum(dim=(1, 2))
    if output is None:
        return scores
    return scores, output.view(batch, heads, q_length, width)


def _later_keys(length: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool, True above the diagonal: the keys after each query (built once per length and device)."""
    key = (length, str(device))
    later = _LATER.get(key)
    if later is None:
        if len(_LATER) >= 64:
            _LATER.clear()
        later = _LATER[key] = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)
    return later


_LATER: dict[tuple[int, str], torch.Tensor] = {}


def _one_block_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, scale: float,
                      query_valid: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``key_attention_scores`` of a short causal prefill (no mask, as many keys as queries) in one block: the same
    sums in a handful of operators (at 73 tokens their count, not their arithmetic, is the cost)."""
    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    flat = batch * kv_heads
    grouped = query.float().reshape(flat, groups * length, width)  # query heads of one key head, group-major
    logits = torch.bmm(grouped, key.float().reshape(flat, length, width).transpose(1, 2)).mul_(scale)
    logits.view(flat, groups, length, length).masked_fill_(_later_keys(length, query.device), float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B * H_kv, G * T, T); every query sees itself: no NaN row
    del logits
    rows = probs.view(batch, kv_heads * groups * length, length)  # (B, H * T, T)
    if query_valid is None:
        scores = rows.sum(dim=1)  # (B, T)
    else:  # rows run head-major: the query weights once per head
        weights = query_valid.to(torch.float32).repeat(1, heads)[:, None]  # (B, 1, H * T)
        scores = torch.bmm(weights, rows)[:, 0]  # (B, T)
    if value is None:
        return scores
    output = torch.bmm(probs, value.float().reshape(flat, length, width))  # (B * H_kv, G * T, d)
    return scores, output.view(batch, heads, length, width)


def _fusable(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
             kwargs: dict) -> bool:
    """Whether a tapped layer's attention output may come from the scoring pass itself: float32 on CPU (where the
    second pass cost 4x an ordinary layer), no dropout, a causal or bool mask, nothing SDPA adds on top."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or (torch.is_grad_enabled() and query.requires_grad):
        return False
    if (module.training and kwargs.get("dropout", 0.0)) or any(
            kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks")):
        return False
    if attention_mask is None:
        return bool(kwargs.get("is_causal", getattr(module, "is_causal", True))) and key.shape[2] == query.shape[2]
    return attention_mask.dtype == torch.bool


def speechtrim_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Stock SDPA attention; with a ``speechtrim_tap`` during prefill, also records key scores and key states.

    A tap that asks for scores on CPU in float32 gets the layer's attention output from the scoring pass
    (``key_attention_scores(value=...)``): the same softmax, computed once; it equals SDPA's to float32 rounding
    (about 1e-6), not bit for bit. Elsewhere SDPA runs as usual and the scores take a second pass.

    Args:
        module: the attention module (gives ``num_key_value_groups``, ``is_causal``).
        query: (B, H, T_q, d).
        key: (B, H_kv, T_kv, d).
        value: (B, H_kv, T_kv, d).
        attention_mask: the layer's mask as the SDPA backend expects it.
        **kwargs: passed on to transformers' ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tap = kwargs.pop(TAP_KWARG, None)
    if tap is None or query.shape[2] <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    fused = tap.keep_scores and _fusable(module, query, key, attention_mask, kwargs)
    with torch.no_grad():
        if tap.keep_keys:
            tap.keys = key.detach()  # (B, H_kv, T_kv, d)
        if fused:
            tap.scores, output = key_attention_scores(query, key, attention_mask, kwargs.get("scaling"),
                                                      query_valid=tap.query_valid, value=value)
            return output.transpose(1, 2).contiguous(), None  # (B, T_q, H, d), as sdpa_attention_forward gives
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if tap.keep_scores:
        with torch.no_grad():
            tap.scores = key_attention_scores(
                query, key, attention_mask, kwargs.get("scaling"), query_valid=tap.query_valid
            )  # (B, T_kv)
    return output


def register_backend(name: str = BACKEND_NAME) -> str:
    """Register the tapped SDPA backend and its mask builder with transformers (idempotent); return the name.

    Both registrations are needed: without ``AttentionMaskInterface.register`` the decoder builds no mask for an
    unknown implementation and silently passes ``None``.

    Args:
        name: the implementation name to register.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, speechtrim_sdpa_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
