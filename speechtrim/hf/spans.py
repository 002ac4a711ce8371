"""Where the audio tokens are: audio spans per batch row, and the ``span_id`` map reducers work on.

``span_id`` is a (B, T) long tensor: the index (0, 1, ...) of the contiguous audio span a token belongs to in its
row, or -1 for tokens that must never be reduced (text, padding, special tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# Config fields that hold the audio placeholder token id, by family.
_TOKEN_FIELDS = ("audio_token_index", "audio_token_id")
_SUB_CONFIGS = ("thinker_config", "audio_config", "text_config")

AudioSpans = Sequence[Sequence[tuple[int, int]]]


def audio_token_id(config: object) -> int | None:
    """The audio placeholder token id of a model config, wherever the family keeps it; None if it has none.

    Looks at ``audio_token_index`` (Qwen2-Audio, Granite-Speech), ``audio_token_id`` (Voxtral, AudioFlamingo3,
    Gemma-3n), ``thinker_config.audio_token_index`` (Qwen2.5-Omni) and ``audio_config.audio_token_id``
    (Phi-4-multimodal).

    Args:
        config: a Hugging Face config (or the model; its ``.config`` is used).
    """
    config = getattr(config, "config", config)
    pending = [config]
    for _ in range(3):
        next_pending = []
        for item in pending:
            for field in _TOKEN_FIELDS:
                value = getattr(item, field, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
            for name in _SUB_CONFIGS:
                sub = getattr(item, name, None)
                if sub is not None and not isinstance(sub, (int, str, float, bool)):
                    next_pending.append(sub)
        pending = next_pending
    return None


def span_ids_from_input_ids(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Number the contiguous runs of ``token_id`` in each row: (B, T) long, -1 outside audio.

    Args:
        input_ids: (B, T) token ids.
        token_id: the audio placeholder token id.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}; add a batch axis.")
    is_audio = input_ids == token_id  # (B, T)
    previous = torch.nn.functional.pad(is_audio[:, :-1], (1, 0), value=False)  # (B, T)
    starts = is_audio & ~previous  # (B, T): first token of each run
    run_index = starts.long().cumsum(dim=1) - 1  # (B, T)
    return torch.where(is_audio, run_index, torch.full_like(run_index, -1))  # (B, T)


def spans_from_span_ids(span_id: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Turn a (B, T) ``span_id`` map back into per-row lists of ``(start, end)`` spans (end exclusive).

    Args:
        span_id: (B, T) long, -1 outside spans.
    """
    result: list[list[tuple[int, int]]] = []
    padded = torch.nn.functional.pad(span_id, (1, 1), value=-1)  # (B, T + 2)
    change = (padded[:, 1:] != padded[:, :-1]).nonzero().tolist()  # boundaries between runs
    boundaries: list[list[int]] = [[] for _ in range(span_id.shape[0])]
    for row, column in change:
        boundaries[row].append(column)
    for row, cuts in enumerate(boundaries):
        spans = []
        for start, end in zip(cuts[:-1], cuts[1:]):
            if int(span_id[row, start]) >= 0:
                spans.append((start, end))
        result.append(spans)
    return result


def find_audio_spans(input_ids: torch.Tensor, token_id: int) -> list[list[tuple[int, int]]]:
    """Per batch row, the contiguous runs of ``token_id`` as ``(start, end)`` spans (end exclusive).

    Args:
        input_ids: (B, T) token ids.
        token_id: the audio placeholder token id.
    """
    return spans_from_span_ids(span_ids_from_input_ids(input_ids, token_id))


def span_ids_from_spans(
    audio_spans: AudioSpans, batch: int, length: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Build the (B, T) ``span_id`` map from explicit per-row spans, checking that they are valid.

    Args:
        audio_spans: one list per batch row of ``(start, end)`` spans, end exclusive, sorted or not.
        batch: batch size B.
        length: sequence length T.
        device: device of the result.
    """
    if len(audio_spans) != batch:
        raise ValueError(
            f"audio_spans has {len(audio_spans)} rows but the batch has {batch}; give one list of (start, end) "
            "spans per batch row (an empty list for rows without audio)."
        )
    span_id = torch.full((batch, length), -1, dtype=torch.long)
    for row, spans in enumerate(audio_spans):
        ordered = sorted((int(start), int(end)) for start, end in spans)
        previous_end = 0
        for index, (start, end) in enumerate(ordered):
            if not 0 <= start < end <= length:
                raise ValueError(
                    f"audio span ({start}, {end}) in row {row} is outside [0, {length}] or empty; spans are "
                    "(start, end) with 0 <= start < end <= sequence length, end exclusive."
                )
            if start < previous_end:
                raise ValueError(
                    f"audio spans in row {row} overlap at ({start}, {end}); give non-overlapping "
                    "spans (one may start where the previous one ends)."
                )
            span_id[row, start:end] = index
            previous_end = end
    return span_id.to(device)
