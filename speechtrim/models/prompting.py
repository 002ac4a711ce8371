"""How a SpeechLM's prompts are put together: the chat template around the ``<audio>`` marker, the audio embeddings
spliced in, optional answers for training, and left padding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from speechtrim.hf.prefix import KeyValues, PrefixCache

AUDIO_MARKER = "<audio>"
SUMMARY_MARKER = "<audio_summary>"
"""Where a prompt wants the utterance summary (``SpeechLM.summarize``: how the audio is said); a prompt without it
gets none, and a model without a summary drops the marker, so the text is the same as without it."""


@dataclass
class PromptBatch:
    """A left-padded batch of prompts with spliced audio, ready for the LLM.

    With ``prefix`` (``build_inputs(..., prefix_cache=...)``) the text in front of the audio is not in
    ``inputs_embeds``: its cached keys and values (P_max positions, left-padded) come first, and ``attention_mask``
    covers both, (B, P_max + T).
    """

    inputs_embeds: torch.Tensor  # (B, T, D_llm)
    attention_mask: torch.Tensor  # (B, T) long, 0 on left padding; (B, P_max + T) with a prefix
    position_ids: torch.Tensor  # (B, T) long, counting real tokens only (prefix included)
    audio_spans: list[list[tuple[int, int]]]  # per row: [(start, end)] of the audio tokens in inputs_embeds
    extra: dict[str, Any] = field(default_factory=dict)
    prefix: KeyValues | None = None  # per layer: (B, heads, P_max, head_dim) keys and values of the prompt's start


def render_prompt(tokenizer: Any, system_prompt: str | None, user_text: str, assistant_prefix: str = "") -> str:
    """The chat-formatted prompt for one user message containing one ``<audio>`` marker.

    Args:
        tokenizer: the LLM's tokenizer (its chat template, when it has one).
        system_prompt: the chat's system turn (None: the template's default; "": none).
        user_text: the user's message.
        assistant_prefix: text the assistant's turn starts with (e.g. "The emotion of the audio is:").
    """
    if user_text.count(AUDIO_MARKER) != 1:
        raise ValueError(f"a prompt needs exactly one {AUDIO_MARKER!r} marker, got: {user_text!r}")
    if user_text.count(SUMMARY_MARKER) > 1 or SUMMARY_MARKER in user_text.split(AUDIO_MARKER)[0]:
        raise ValueError(f"a prompt takes at most one {SUMMARY_MARKER!r} marker, after {AUDIO_MARKER!r}; got: "
                         f"{user_text!r}")
    if getattr(tokenizer, "chat_template", None):
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        rendered = tokenizer.apply_chat_template(
            [*system, {"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
    else:
        rendered = user_text + "\n"
    return rendered + assistant_prefix

def build_inputs(
    model: Any,
    prompts: list[str],
    audio_embeds: torch.Tensor,
    audio_mask: torch.Tensor,
    targets: list[str] | None = None,
    assistant_prefix: str | list[str] = "",
    prefix_cache: PrefixCache | None = None,
    summary: torch.Tensor | None = None,
) -> PromptBatch:
    """Splice each row's real audio embeddings into its prompt; left-pad the batch.

    Args:
        model: the SpeechLM (its tokenizer, LLM embeddings, system prompt and device).
        prompts: user messages, each with one ``<audio>`` marker.
        audio_embeds: (B, T_a, D_llm); audio_mask: (B, T_a) bool.
        targets: optional answer text per row appended after the prompt (for training); its token positions
            are returned in ``extra["target_spans"]`` and the token ids in ``extra["target_ids"]``.
        assistant_prefix: text the assistant's turn starts with, before any target; one for every row or a
            list with one per row (a batch that mixes tasks).
        prefix_cache: take the keys and values of the text in front of the audio from this cache instead of
            running the LLM over it (same result, less work when prompts repeat: training, scoring). The
            batch then works with ``loss`` and ``score``, not with ``generate`` or token reducers.
        summary: (B, n, D_llm) utterance-summary vectors (``SpeechLM.summarize``), placed where a row's prompt has
            the ``<audio_summary>`` marker, outside its audio span (no token reducer removes them); a prompt
            without the marker gets none, and without ``summary`` the marker is dropped.
    A row whose mask is all False gets no audio tokens and no summary (the text-only baseline).
    """
    if len(prompts) != audio_embeds.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {audio_embeds.shape[0]} clips")
    if summary is not None and (summary.ndim != 3 or summary.shape[0] != len(prompts)):
        raise ValueError(f"summary must be (B, n, D) with B = {len(prompts)} prompts, got {tuple(summary.shape)}")
    prefixes = [assistant_prefix] * len(prompts) if isinstance(assistant_prefix, str) else list(assistant_prefix)
    if len(prefixes) != len(prompts):
        raise ValueError(f"{len(prefixes)} assistant prefixes for {len(prompts)} prompts")
    embedding = model.llm.get_input_embeddings()
    rows: list[torch.Tensor] = []
    spans: list[list[tuple[int, int]]] = []
    target_spans: list[tuple[int, int]] = []
    target_ids: list[torch.Tensor] = []
    prefix_ids: list[torch.Tensor] = []
    for row, prompt in enumerate(prompts):
        before, after = model.render_prompt(prompt, prefixes[row]).split(AUDIO_MARKER)
        between, _, after = after.rpartition(SUMMARY_MARKER)  # between: text from the audio to the marker
        before_ids = model._ids(before)
        between_ids = model._ids(between)
        after_ids = model._ids(after)
        audio = audio_embeds[row, audio_mask[row]]  # (n_audio, D)
        if prefix_cache is not None:  # the text before the audio comes from the cache, unless nothing follows
            cached = before_ids if len(audio) or len(after_ids) or targets is not None else before_ids[:0]
            prefix_ids.append(cached)
            before_ids = before_ids[len(cached) :]
        wanted = summary is not None and len(audio) and SUMMARY_MARKER in prompt
        extra_audio = summary[row] if wanted else audio[:0]  # (n or 0, D)
        pieces = [embedding(before_ids), audio.to(embedding.weight.dtype), embedding(between_ids),
                  extra_audio.to(embedding.weight.dtype), embedding(after_ids)]
        length = len(before_ids) + len(audio) + len(between_ids) + len(extra_audio) + len(after_ids)
        if targets is not None:
            answer_ids = model._ids(targets[row])
            if model.tokenizer.eos_token_id is not None:  # the id itself: text concatenation can merge words
                answer_ids = torch.cat([answer_ids, answer_ids.new_tensor([model.tokenizer.eos_token_id])])
            pieces.append(embedding(answer_ids))
            target_spans.append((length, length + len(answer_ids)))
            target_ids.append(answer_ids)
        spans.append([(len(before_ids), len(before_ids) + len(audio))])
        rows.append(torch.cat(pieces, dim=0))
    inputs, attention, offsets = _left_pad(model, rows)
    spans = [[(start + offset, end + offset) for start, end in row] for row, offset in zip(spans, offsets)]
    target_spans = [(start + offset, end + offset) for (start, end), offset in zip(target_spans, offsets)]
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    extra: dict[str, Any] = {}
    if targets is not None:
        extra = {"target_spans": target_spans, "target_ids": target_ids}
    prefix = None
    if prefix_cache is not None and any(len(ids) for ids in prefix_ids):
        prefix, prefix_mask = prefix_cache.batch(prefix_ids)
        positions = positions + prefix_mask.sum(dim=1, keepdim=True)
        attention = torch.cat([prefix_mask, attention], dim=1)
    return PromptBatch(inputs, attention, positions, spans, extra, prefix)

def _left_pad(model: Any, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Rows of embeddings (T_i, D) -> left-padded (B, T, D), its (B, T) mask, and each row's offset."""
    embedding = model.llm.get_input_embeddings()
    longest = max(len(r) for r in rows)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    pad_vector = embedding(torch.tensor([pad_id], device=model.device))[0]
    inputs = pad_vector.expand(len(rows), longest, -1).clone()  # (B, T, D)
    attention = torch.zeros(len(rows), longest, dtype=torch.long, device=model.device)
    offsets = [longest - len(embeds) for embeds in rows]
    for row, (embeds, offset) in enumerate(zip(rows, offsets)):
        inputs[row, offset:] = embeds
        attention[row, offset:] = 1
    return inputs, attention, offsets


__all__ = ["AUDIO_MARKER", "SUMMARY_MARKER", "PromptBatch", "build_inputs", "render_prompt"]
