"""Reduction before the LLM: the base of the methods that shrink the audio embeddings before the decoder runs.

A pre-LLM method sees the audio embeddings (the projector's outputs, or a spliced model's input embeddings) and
removes ``count_to_remove(n, ratio)`` of every audio span's n tokens, so each clip keeps a number of tokens fixed by
its length and the ratio alone (:meth:`PreLLMReducer.output_length`): a serving engine sizes its audio placeholders
before the embeddings exist, and the LLM itself runs unchanged on a shorter prompt (any engine, vLLM included).

Two ways to run one:
- :func:`reduce_embeddings` on right-padded audio embeddings (B, N, D) before they are spliced into the prompt:
  what speechtrim's SpeechLM (``with reducer(speechlm):``), the benchmark and the vLLM engine do;
- ``with reducer(hf_model):`` on a Hugging Face model that splices its own audio embeddings at an audio token id:
  the decoder's input embeddings are reduced before layer 0 and the survivors renumbered 0..n-1
  (:class:`speechtrim.hf.attach.Attachment`), the same computation as the LLM on the shorter prompt.

Helpers shared by the methods: per-span budgets (:func:`merge_per_span`, :func:`evict_per_span`) and the
parameter-free self-attention that stands in for the audio encoder's attention (:func:`self_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from speechtrim.ops.merge import merge_plan
from speechtrim.ops.plan import Plan, apply_plan
from speechtrim.ops.select import count_to_remove_int, evict_plan, span_counts_to_remove, top_per_span
from speechtrim.reducers.base import Reducer
from speechtrim.reduction import LayerStep, ModelShape


@dataclass
class PreLLMReducer(Reducer):
    """A reducer that acts once, on the audio embeddings, before the LLM's first layer.

    ``ratio`` is the share of every audio span's tokens removed; ``flops_reduction`` solves that share per prompt
    (FastAdaSP eq. 10 with one reduction at layer 0). ``layer`` and ``schedule`` do not apply.

    Class attributes:
        needs_ctc_head: the method reads CTC logits over the LLM's vocabulary (``LayerStep.audio_logits``).
    """

    acts_on: ClassVar[str] = "embeddings"
    default_layer: ClassVar[int] = 0
    default_schedule: ClassVar[str] = "none"
    needs_ctc_head: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.layer not in (None, 0):
            raise ValueError(f"{self.name} reduces the audio embeddings before the LLM, so it has no layer: leave "
                             f"layer unset (got layer={self.layer!r})")
        if self.schedule not in (None, "none"):
            raise ValueError(f"{self.name} reduces once, before the LLM: schedule must be 'none' (got "
                             f"{self.schedule!r})")
        if self.positions != "original":
            raise ValueError(f"{self.name} hands the LLM a shorter prompt numbered 0..n-1 anyway: leave positions "
                             f"at 'original' (got {self.positions!r})")
        super().__post_init__()

    def removal_counts(self, span_id: torch.Tensor, ratio: float) -> torch.Tensor:
        """(B,) tokens removed per row: the sum over its spans of ``count_to_remove(span length, ratio)``."""
        return span_counts_to_remove(span_id, ratio).sum(dim=1)

    def embedding_ratio(self, audio_tokens: int, text_tokens: int = 0, shape: ModelShape | None = None) -> float:
        """The share of audio tokens removed in a prompt with these counts (``ratio``, or the one that saves
        ``flops_reduction`` of its prefill FLOPs, which needs the decoder's ``shape``)."""
        if self.flops_reduction is None:
            return float(self.ratio)
        if shape is None:
            raise ValueError(f"{self.name} with flops_reduction= needs the decoder's shape (ModelShape) to solve "
                             "its ratio; pass shape= or build it with ratio=")
        return float(self.prefill_ratios(0, shape, text_tokens, audio_tokens)[0])

    def output_length(self, audio_tokens: int, text_tokens: int = 0, shape: ModelShape | None = None) -> int:
        """Audio tokens this reducer emits for one clip of ``audio_tokens`` tokens: a function of the length and the
        ratio only (with ``flops_reduction``, of the prompt's text tokens and the decoder's shape too).

        Args:
            audio_tokens: the clip's audio tokens before reduction.
            text_tokens: the prompt's text tokens (``flops_reduction`` only).
            shape: the decoder's sizes (``flops_reduction`` only).
        """
        ratio = self.embedding_ratio(audio_tokens, text_tokens, shape)
        return audio_tokens - count_to_remove_int(audio_tokens, ratio)


# ---------------------------------------------------------------------------------------------- running one
@dataclass
class ReducedEmbeddings:
    """Audio embeddings after a pre-LLM method.

    Args:
        embeds: (B, N', D) the surviving (merged) embeddings, right-padded.
        mask: (B, N') bool, real tokens.
        ratios: the ratio each row ran.
        removed: tokens removed per row.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    ratios: list[float]
    removed: list[int]


def reduce_embeddings(reducer: PreLLMReducer, embeds: torch.Tensor, mask: torch.Tensor,
                      logits: torch.Tensor | None = None, text_tokens: list[int] | None = None,
                      shape: ModelShape | None = None) -> ReducedEmbeddings:
    """Run a pre-LLM method on right-padded audio embeddings, one clip per row.

    Args:
        reducer: the method.
        embeds: (B, N, D) audio embeddings.
        mask: (B, N) bool, real tokens (right padding).
        logits: (B, N, K+1) CTC logits over the LLM's vocabulary aligned with the embeddings, or None.
        text_tokens: each row's prompt text tokens (``flops_reduction`` only).
        shape: the decoder's sizes (``flops_reduction`` only).
    """
    if embeds.dim() != 3 or tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"reduce_embeddings expects embeds (B, N, D) and mask (B, N), got {tuple(embeds.shape)} "
                         f"and {tuple(mask.shape)}")
    if reducer.needs_ctc_head and logits is None:
        raise ValueError(f"{reducer.name} reads CTC logits over the LLM's vocabulary, which this model does not "
                         "have: use a SpeechLM with projector='vocab' (the embedded model has one) or another "
                         "pre-LLM method (pre_merge, samp, segment_topk)")
    mask = mask.bool()
    counts = mask.sum(dim=1).tolist()
    texts = text_tokens if text_tokens is not None else [0] * len(counts)
    ratios = [reducer.embedding_ratio(int(n), int(t), shape) for n, t in zip(counts, texts)]
    if not any(ratios):  # nothing to remove: the very same tensors
        return ReducedEmbeddings(embeds, mask, ratios, [0] * len(ratios))
    out_embeds: list[torch.Tensor] = []
    removed: list[int] = []
    for ratio in sorted(set(ratios)):  # rows of one ratio run together
        rows = [row for row, value in enumerate(ratios) if value == ratio]
        part_embeds, part_mask = embeds[rows], mask[rows]
        span_id = torch.where(part_mask, torch.zeros_like(part_mask, dtype=torch.long), -1)
        num_remove = reducer.removal_counts(span_id, ratio)
        if ratio > 0:
            step = LayerStep(0, part_embeds, span_id, num_remove, ratio, part_mask,
                             audio_logits=logits[rows] if logits is not None else None)
            plan = reducer.plan(step)
            if not torch.equal(plan.removed.cpu(), num_remove.cpu()):
                raise RuntimeError(f"{reducer.name} removed {plan.removed.tolist()} tokens where its budget is "
                                   f"{num_remove.tolist()}: a pre-LLM method must emit exactly output_length()")
            reduced = apply_plan(plan, part_embeds)  # (b, N', D), fillers on the left
            kept = part_mask.gather(1, plan.source) & ~plan.filler
        else:
            reduced, kept = part_embeds, part_mask
        for index, row in enumerate(rows):
            out_embeds.append((row, reduced[index][kept[index]]))
            removed.append((row, int(num_remove[index])))
    out_embeds.sort(key=lambda pair: pair[0])
    removed.sort(key=lambda pair: pair[0])
    rows = [tensor for _, tensor in out_embeds]
    longest = max(int(tensor.shape[0]) for tensor in rows)
    padded = embeds.new_zeros(len(rows), longest, embeds.shape[2])
    new_mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=embeds.device)
    for row, tensor in enumerate(rows):
        padded[row, : tensor.shape[0]] = tensor
        new_mask[row, : tensor.shape[0]] = True
    return ReducedEmbeddings(padded, new_mask, ratios, [count for _, count in removed])


# ---------------------------------------------------------------------------------------------- shared ops
def merge_per_span(similarity: torch.Tensor, span_id: torch.Tensor, ratio: float,
                   weights: torch.Tensor | None = None) -> Plan:
    """Merge the most similar adjacent pairs of every span, ``count_to_remove(span length, ratio)`` pairs each
    (chained into clusters, FastAdaSP A.3); each cluster becomes the ``weights``-weighted mean of its members.

    Args:
        similarity: (B, T-1) score of each adjacent pair; -inf where the pair crosses a span border.
        span_id: (B, T) span of each token, -1 = not audio.
        ratio: share of every span's tokens removed.
        weights: (B, T) merge weights (None: plain means).
    """
    pair_span = torch.where(torch.isfinite(similarity), span_id[:, :-1], torch.full_like(span_id[:, :-1], -1))
    chosen = top_per_span(similarity, pair_span, span_counts_to_remove(span_id, ratio))  # (B, T-1)
    masked = torch.where(chosen, similarity, torch.full_like(similarity, float("-inf")))
    weights = weights if weights is not None else torch.ones(span_id.shape, device=similarity.device)
    return merge_plan(masked, weights, chosen.sum(dim=1))


def evict_per_span(scores: torch.Tensor, span_id: torch.Tensor, counts: torch.Tensor) -> Plan:
    """Drop the ``counts[b, s]`` lowest-scoring tokens of every span (or segment) s of every row b.

    Args:
        scores: (B, T) importance of each token.
        span_id: (B, T) span (or segment) of each token, -1 = not audio.
        counts: (B, S) tokens to drop per span.
    """
    dropped = top_per_span(-scores.float(), span_id, counts)  # (B, T)
    return evict_plan(scores, dropped, dropped.sum(dim=1))


def self_attention(hidden: torch.Tensor, span_id: torch.Tensor) -> torch.Tensor:
    """(B, T, T) a parameter-free attention of every audio token over the audio tokens of its own span:
    softmax(x_q . x_k / sqrt(D)) with the embeddings as queries and keys (0 outside the span).

    SA-MAP and Segmentwise Top-K read the audio encoder's last self-attention layer; a pre-LLM method that sees
    only the embeddings (any model, any serving engine) uses this in its place.

    Args:
        hidden: (B, T, D) embeddings.
        span_id: (B, T) span of each token, -1 = not audio.
    """
    x = hidden.float()
    logits = x @ x.transpose(1, 2) / x.shape[-1] ** 0.5  # (B, T, T)
    same = (span_id.unsqueeze(2) == span_id.unsqueeze(1)) & (span_id >= 0).unsqueeze(2)
    logits = logits.masked_fill(~same, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)  # rows of non-audio tokens: all -inf -> 0


def attention_received(hidden: torch.Tensor, span_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) mean attention each audio token receives from its span's tokens under :func:`self_attention`, and
    (B, T) its attention to itself (the diagonal)."""
    weights = self_attention(hidden, span_id)  # (B, T, T)
    lengths = (span_id.unsqueeze(2) == span_id.unsqueeze(1)).sum(dim=1).clamp(min=1)  # (B, T)
    received = weights.sum(dim=1) / lengths
    return received.masked_fill(span_id < 0, 0.0), weights.diagonal(dim1=1, dim2=2)


__all__ = ["PreLLMReducer", "ReducedEmbeddings", "attention_received", "evict_per_span", "merge_per_span",
           "reduce_embeddings", "self_attention"]
