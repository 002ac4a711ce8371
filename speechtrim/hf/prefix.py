"""Reuse of the frozen LLM's keys and values for the text in front of the audio.

Training and label scoring run the frozen LLM over prompts whose start (the chat template, "Transcription: ...",
"Audio: ") does not depend on anything trainable. Its keys and values are the same in every epoch and fold, so
``PrefixCache`` computes them once per distinct token sequence (no gradient) and the LLM then runs only on the audio
and the text after it, attending to the cached prefix. The result is the same computation as running the whole
prompt (tests compare losses, gradients and scores); it saves the prefix's forward and backward pass at every step.

Not for generation with token reducers: they expect the whole prompt in one prefill.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from speechtrim.hf.layers import returned_cache

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values (heads, tokens, head_dim)


class PrefixCache:
    """A bounded, least-recently-used store of the frozen LLM's keys and values per prefix token sequence.

    Args:
        llm: the frozen causal LM (its weights must not change while the cache is in use).
        max_megabytes: memory bound of the stored keys and values; the least recently used prefixes go first.
    """

    def __init__(self, llm: nn.Module, max_megabytes: float = 512.0) -> None:
        if not max_megabytes > 0:
            raise ValueError(f"max_megabytes must be > 0, got {max_megabytes}")
        self.llm = llm
        self.max_bytes = int(max_megabytes * 2**20)
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, ...], KeyValues] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @torch.no_grad()
    def key_values(self, ids: torch.Tensor) -> KeyValues:
        """Keys and values of every layer for the token ids ``ids`` (1-D), positions 0..len-1."""
        key = tuple(ids.tolist())
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        out = self.llm(input_ids=ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
        layers = [(layer.keys[0].detach(), layer.values[0].detach()) for layer in returned_cache(out).layers]
        self._entries[key] = layers
        self._bytes += _nbytes(layers)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            self._bytes -= _nbytes(self._entries.popitem(last=False)[1])
        return layers

    def batch(self, prefixes: list[torch.Tensor]) -> tuple[KeyValues, torch.Tensor]:
        """Left-padded keys and values of a batch of prefixes, and their attention mask (B, P_max) long.

        Rows shorter than the longest are padded with zeros at the front, masked out.
        """
        longest = max(len(ids) for ids in prefixes)
        entries = [self.key_values(ids) if len(ids) else None for ids in prefixes]
        template = next(entry for entry in entries if entry is not None)
        mask = torch.zeros(len(prefixes), longest, dtype=torch.long, device=template[0][0].device)
        batched: KeyValues = []
        for layer, (keys, values) in enumerate(template):
            heads, _, width = keys.shape
            batch_keys = keys.new_zeros(len(prefixes), heads, longest, width)
            batch_values = values.new_zeros(len(prefixes), values.shape[0], longest, values.shape[2])
            for row, entry in enumerate(entries):
                if entry is not None:
                    length = entry[layer][0].shape[1]
                    batch_keys[row, :, longest - length :] = entry[layer][0]
                    batch_values[row, :, longest - length :] = entry[layer][1]
                    mask[row, longest - length :] = 1
            batched.append((batch_keys, batch_values))
        return batched, mask


def _nbytes(layers: KeyValues) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def as_cache(key_values: KeyValues, config) -> object:
    """A fresh Hugging Face ``DynamicCache`` holding ``key_values`` (the model's forward extends it in place)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in key_values], config=config)
