"""Eviction plans (FastV, random_evict) and the count_to_remove rounding rule."""

import pytest
import torch

from speechtrim.ops import apply_plan, count_to_remove, count_to_remove_int, evict_plan


def test_eviction_keeps_the_highest_scoring_reducible_tokens():
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        batch, length = 3, 30
        scores = torch.randn(batch, length, generator=generator)
        reducible = torch.rand(batch, length, generator=generator) < 0.6
        num_evict = torch.randint(0, 12, (batch,), generator=generator)
        plan = evict_plan(scores, reducible, num_evict)
        hidden = torch.randn(batch, length, 4, generator=generator)
        reduced = apply_plan(plan, hidden)
        for b in range(batch):
            count = int(reducible[b].sum())
            k = min(int(num_evict[b]), count)
            kept = plan.slot[b] >= 0
            assert int((kept & reducible[b]).sum()) == count - k  # exactly count - k reducible tokens survive
            assert bool(kept[~reducible[b]].all())  # text / padding never evicted
            if 0 < k < count:
                assert scores[b][reducible[b] & kept].min() > scores[b][reducible[b] & ~kept].max()
            # Survivors keep their order, after the left fillers.
            pad = int(plan.filler[b].sum())
            assert torch.equal(reduced[b, pad:], hidden[b, kept])
            assert torch.equal(plan.source[b, pad:], kept.nonzero().flatten())
            assert plan.removed[b] == k


def test_eviction_ties_drop_the_earlier_token():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0, 5.0]])
    plan = evict_plan(scores, torch.tensor([[True, True, True, True, False]]), torch.tensor([2]))
    assert plan.slot.tolist() == [[-1, 0, 1, -1, 2]]


def test_evicting_more_than_reducible_drops_all_of_them_and_reports_it():
    reducible = torch.tensor([[False, True, True, False], [True, True, True, True]])
    plan = evict_plan(torch.tensor([[0.0, float("inf"), 1.0, 0.0], [4.0, 3.0, 2.0, 1.0]]), reducible,
                      torch.tensor([5, 1]))
    assert plan.removed.tolist() == [2, 1]
    assert plan.slot[0].tolist() == [1, -1, -1, 2]  # one left filler: row 1 keeps 3 tokens
    assert plan.filler.tolist() == [[True, False, False], [False, False, False]]


def test_count_to_remove_rounds_half_down_and_keeps_one_token():
    counts = torch.tensor([10, 5, 3, 1, 0, 7])
    assert count_to_remove(counts, 0.25).tolist() == [2, 1, 1, 0, 0, 2]  # 2.5 -> 2, 1.25 -> 1, 0.75 -> 1, 1.75 -> 2
    assert count_to_remove(counts, 0.5).tolist() == [5, 2, 1, 0, 0, 3]  # 2.5 -> 2, 1.5 -> 1, 3.5 -> 3
    assert count_to_remove(counts, 0.99).tolist() == [9, 4, 2, 0, 0, 6]  # capped at n - 1
    assert count_to_remove(counts, 0.0).tolist() == [0] * 6
    for n in range(0, 60):
        for ratio in (0.1, 0.3, 0.45, 0.5, 0.7, 0.95):
            assert count_to_remove_int(n, ratio) == int(count_to_remove(torch.tensor([n]), ratio)[0])


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, True, "0.3"])
def test_count_to_remove_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        count_to_remove(torch.tensor([10]), ratio)


def test_evict_plan_rejects_nan_scores():
    with pytest.raises(ValueError, match="NaN"):
        evict_plan(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([1]))
