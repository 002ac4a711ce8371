"""Which tokens a method removes, not only how many: each method's plan on a hand-built step with planted answers.

Every check here is shown to fail for the opposite choice (a variant that drops the most-attended tokens, or merges
the least similar pair), so it can fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from speechtrim import reducers
from speechtrim.reducers.fastv import FastV
from speechtrim.reduction import LayerStep

TEXT, AUDIO = 3, 12  # 3 text tokens, 12 audio tokens, 3 text tokens


def span_id(batch: int = 2) -> torch.Tensor:
    row = torch.tensor([-1] * TEXT + [0] * AUDIO + [-1] * TEXT)
    return row.expand(batch, -1).clone()


def planted_scores(seed: int) -> tuple[torch.Tensor, list[set[int]]]:
    """(B, T) distinct scores, and per row the indices of the 4 least-attended audio tokens."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, TEXT + AUDIO + TEXT, generator=generator) + 1.0
    scores[:, :TEXT] = scores[:, -TEXT:] = 0.0  # text gets the least attention: it must stay anyway
    lowest = []
    for row in range(2):
        audio = torch.arange(TEXT, TEXT + AUDIO)
        lowest.append(set(audio[scores[row, audio].argsort()[:4]].tolist()))
    return scores, lowest


def evicted(plan) -> list[set[int]]:
    return [set((plan.slot[row] < 0).nonzero().squeeze(1).tolist()) for row in range(plan.batch)]


def check_drops_least_attended(method) -> None:
    scores, lowest = planted_scores(seed=1)
    step = LayerStep(2, torch.zeros(2, scores.shape[1], 8), span_id(), torch.tensor([4, 4]), 0.33, None, scores)
    assert evicted(method.plan(step)) == lowest


@dataclass
class MostAttended(FastV):
    """The wrong choice, to show the check can fail."""

    def plan(self, step):
        return super().plan(LayerStep(step.layer, step.hidden, step.span_id, step.num_remove, step.ratio, step.valid,
                                      -step.scores))


@pytest.mark.parametrize("name", ["fastv", "h2o"])
def test_attention_evictors_drop_the_least_attended_audio_tokens(name):
    check_drops_least_attended(reducers.build(name, ratio=0.3))
    with pytest.raises(AssertionError):
        check_drops_least_attended(MostAttended(ratio=0.3))


def test_fastadasp_merges_the_most_similar_adjacent_pair():
    generator = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, TEXT + AUDIO + TEXT, 8, generator=generator)  # (B, H_kv, T, d)
    pair = TEXT + 6
    keys[:, :, pair + 1] = keys[:, :, pair] + 0.01 * keys[:, :, pair + 1]  # a planted, nearly identical pair
    scores = torch.ones(1, keys.shape[2])
    step = LayerStep(2, torch.zeros(1, keys.shape[2], 8), span_id(1), torch.tensor([1]), 0.1, None, scores, keys)
    plan = reducers.build("fastadasp", ratio=0.1).plan(step)
    slots = plan.slot[0]
    assert int(plan.removed[0]) == 1 and slots[pair] == slots[pair + 1] >= 0  # merged into one slot
    flat = keys[0].transpose(0, 1).reshape(keys.shape[2], -1)  # (T, H_kv * d)
    audio = flat[TEXT : TEXT + AUDIO]
    by_hand = torch.nn.functional.cosine_similarity(audio[:-1], audio[1:], dim=-1)  # (AUDIO - 1,)
    assert int(by_hand.argmax()) + TEXT == pair  # the planted pair is the most similar by hand as well
    least = int(by_hand.argmin()) + TEXT
    assert slots[least] != slots[least + 1]  # the least similar pair is left alone
