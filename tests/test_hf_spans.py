"""Audio spans: token id lookup across config layouts, span maps, validation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from speechtrim.hf.spans import (
    audio_token_id,
    find_audio_spans,
    span_ids_from_input_ids,
    span_ids_from_spans,
    spans_from_span_ids,
)


@pytest.mark.parametrize(
    "config, expected",
    [
        (SimpleNamespace(audio_token_index=151646), 151646),  # Qwen2-Audio, Granite-Speech
        (SimpleNamespace(audio_token_id=24), 24),  # Voxtral, AudioFlamingo3, Gemma-3n
        (SimpleNamespace(thinker_config=SimpleNamespace(audio_token_index=151646)), 151646),  # Qwen2.5-Omni
        (SimpleNamespace(audio_config=SimpleNamespace(audio_token_id=200011)), 200011),  # Phi-4-multimodal
        (SimpleNamespace(vocab_size=10), None),  # text-only LM
    ],
)
def test_audio_token_id_found_wherever_the_config_keeps_it(config, expected):
    assert audio_token_id(config) == expected


def test_audio_token_id_of_real_configs():
    from tests.tiny_models import AUDIO_TOKEN, tiny_qwen2_audio

    assert audio_token_id(tiny_qwen2_audio().config) == AUDIO_TOKEN


def test_span_ids_number_contiguous_runs_per_row():
    ids = torch.tensor([[0, 7, 7, 3, 7, 4], [7, 7, 7, 1, 2, 7]])
    span_id = span_ids_from_input_ids(ids, 7)
    assert span_id.tolist() == [[-1, 0, 0, -1, 1, -1], [0, 0, 0, -1, -1, 1]]
    assert find_audio_spans(ids, 7) == [[(1, 3), (4, 5)], [(0, 3), (5, 6)]]


def test_explicit_spans_round_trip_and_touching_spans_stay_apart():
    span_id = span_ids_from_spans([[(4, 6), (1, 3)], [], [(0, 2), (2, 5)]], batch=3, length=6)
    assert span_id.tolist() == [[-1, 0, 0, -1, 1, 1], [-1] * 6, [0, 0, 1, 1, 1, -1]]
    assert spans_from_span_ids(span_id) == [[(1, 3), (4, 6)], [], [(0, 2), (2, 5)]]


@pytest.mark.parametrize(
    "spans, match",
    [
        ([[(2, 9)]], "outside"),
        ([[(3, 3)]], "outside"),
        ([[(-1, 2)]], "outside"),
        ([[(0, 4), (3, 6)]], "overlap"),
        ([[(0, 2)], [(1, 2)]], "rows"),
    ],
)
def test_bad_spans_are_refused_with_a_clear_error(spans, match):
    with pytest.raises(ValueError, match=match):
        span_ids_from_spans(spans, batch=1, length=8)
