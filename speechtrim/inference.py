"""The two ways an answer is read from a prefilled decoder, shared by SpeechLM, the benchmark and training evaluation.

- :func:`candidate_log_probs`: the log-probability of each candidate answer (an emotion label), continuing from the
  prompt's KV cache, so a label is read without parsing generated text;
- :func:`greedy_continue` / :func:`greedy_continue_batch`: greedy decoding step by step from the prompt's cache
  (one prompt, or a left-padded batch), which the benchmark times apart from the prefill.

Both take the decoder's prefill output as it is (last-position logits and cache), so they work the same with a
reducer attached: a reduced cache is simply shorter.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from speechtrim.hf.layers import CACHE_KWARG


@torch.no_grad()
def candidate_log_probs(decoder: nn.Module, first_logits: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, candidates: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-probability of each candidate continuation after each prompt: (B, C).

    Args:
        decoder: the causal LM that ran the prefill.
        first_logits: (B, V) its logits at the prompt's last position.
        cache: the prefill's KV cache; each multi-token candidate continues from a copy of it.
        attention_mask: (B, T) the prompt's 2-D mask.
        position_ids: the prompt's position ids ((B, T), or (3, B, T) for M-RoPE).
        candidates: token ids of each candidate answer.
    """
    if not candidates:
        raise ValueError("candidate_log_probs needs at least one candidate")
    first = torch.log_softmax(first_logits.float(), dim=-1)  # (B, V)
    batch, device = first.shape[0], first.device
    last = position_ids[..., -1:]  # (B, 1) or (3, B, 1)
    scores = torch.zeros(batch, len(candidates), device=device)
    for index, ids in enumerate(candidates):
        ids = torch.as_tensor(list(ids), device=device)
        if ids.numel() == 0:
            raise ValueError(f"candidate {index} has no tokens")
        scores[:, index] = first[:, ids[0]]
        if len(ids) > 1:
            steps = torch.arange(1, len(ids), device=device)
            mask = torch.cat([attention_mask, attention_mask.new_ones(batch, len(ids) - 1)], dim=1)
            rest = decoder(input_ids=ids[:-1].expand(batch, -1), attention_mask=mask, position_ids=last + steps,
                           use_cache=True, **{CACHE_KWARG: copy.deepcopy(cache)}).logits.float()  # (B, L-1, V)
            log_probs = torch.log_softmax(rest, dim=-1)
            scores[:, index] += log_probs.gather(-1, ids[1:].expand(batch, -1).unsqueeze(-1)).squeeze(-1).sum(1)
    return scores


@torch.no_grad()
def greedy_continue(decoder: nn.Module, first_logits: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy token ids after one prompt (batch of one), the first from ``first_logits``; stops at ``eos``.

    Args:
        decoder: the causal LM that ran the prefill.
        first_logits: (1, V) its logits at the prompt's last position.
        cache: the prefill's KV cache (extended in place).
        attention_mask: (1, T) the prompt's 2-D mask.
        position_ids: the prompt's position ids ((1, T), or (3, 1, T) for M-RoPE).
        max_new_tokens: most tokens returned.
        eos: ids that end the answer (empty: always ``max_new_tokens``).
    """
    return greedy_continue_batch(decoder, first_logits, cache, attention_mask, position_ids, max_new_tokens, eos)[0]


@torch.no_grad()
def greedy_continue_batch(decoder: nn.Module, first_logits: torch.Tensor, cache: Any, attention_mask: torch.Tensor,
                          position_ids: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[list[int]]:
    """Greedy token ids after each prompt of a left-padded batch, the first from ``first_logits``; a row ends at
    ``eos`` (kept) and the loop when every row has ended, as ``generate`` does (a finished row's later tokens are
    computed and dropped).

    Args:
        decoder: the causal LM that ran the prefill.
        first_logits: (B, V) its logits at the prompts' last position.
        cache: the prefill's KV cache (extended in place).
        attention_mask: (B, T) the prompts' 2-D mask (0 = left padding).
        position_ids: the prompts' position ids ((B, T), or (3, B, T) for M-RoPE).
        max_new_tokens: most tokens returned per row.
        eos: ids that end an answer (empty: always ``max_new_tokens``).
    """
    mask = attention_mask
    position = position_ids[..., -1:]
    token = first_logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    generated = [[int(value)] for value in token[:, 0].tolist()]
    ended = [row[-1] in eos for row in generated]
    steps = 1
    while steps < max_new_tokens and not all(ended):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        out = decoder(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                      **{CACHE_KWARG: cache})
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        steps += 1
        for row, value in enumerate(token[:, 0].tolist()):
            if not ended[row]:
                generated[row].append(int(value))
                ended[row] = value in eos
    return generated


__all__ = ["candidate_log_probs", "greedy_continue", "greedy_continue_batch"]
