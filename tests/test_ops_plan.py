"""Plan bookkeeping: identity plans, left fillers, sources, apply_plan edge cases and gather_time layouts."""

import pytest
import torch

from speechtrim.ops import (
    Plan,
    apply_plan,
    compose_plans,
    evict_plan,
    gather_time,
    identity_plan,
    merge_plan,
    plan_from_slots,
)


def two_row_plan() -> Plan:
    """Row 0 merges tokens 1-2 (removes 1); row 1 merges 0-1 and 3-4-5 (removes 3): row 0 gets two left fillers."""
    similarity = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.0], [0.9, 0.1, 0.2, 0.8, 0.7]])
    weights = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0, 4.0, 4.0]])
    return merge_plan(similarity, weights, torch.tensor([1, 3]))


def test_identity_plan_changes_nothing():
    plan = identity_plan(2, 5, "cpu")
    hidden = torch.randn(2, 5, 3)
    assert plan.new_length == 5 and plan.removed.tolist() == [0, 0]
    assert torch.equal(apply_plan(plan, hidden), hidden)
    positions = torch.arange(5).expand(2, 5)
    assert torch.equal(gather_time(plan, positions, dim=1), positions)


def test_fillers_are_on_the_left_and_rows_align():
    plan = two_row_plan()
    # Row 0: 5 slots left, row 1: 3 slots; both padded to T_new = 6 - 1 = 5.
    assert plan.new_length == 5
    assert plan.removed.tolist() == [1, 3]
    assert plan.filler.tolist() == [[False] * 5, [True, True, False, False, False]]
    assert plan.slot.tolist() == [[0, 1, 1, 2, 3, 4], [2, 2, 3, 4, 4, 4]]
    # Sources: largest weight in the cluster; ties to the first member; fillers point at the row's first token.
    assert plan.source.tolist() == [[0, 2, 3, 4, 5], [0, 0, 1, 2, 4]]


def test_apply_plan_fillers_copy_their_source_and_slots_average():
    plan = two_row_plan()
    hidden = torch.randn(2, 6, 4)
    merged = apply_plan(plan, hidden)
    torch.testing.assert_close(merged[1, 0], hidden[1, 0])
    torch.testing.assert_close(merged[1, 1], hidden[1, 0])
    torch.testing.assert_close(merged[1, 2], (hidden[1, 0] + 2 * hidden[1, 1]) / 3)
    torch.testing.assert_close(merged[1, 4], (hidden[1, 3] + 4 * hidden[1, 4] + 4 * hidden[1, 5]) / 9)
    torch.testing.assert_close(merged[0, 1], (hidden[0, 1] + 3 * hidden[0, 2]) / 4)


def test_zero_weight_cluster_falls_back_to_plain_mean():
    starts = torch.tensor([[True, False, True]])
    plan = plan_from_slots(starts, torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0.0, 0.0, 0.0]]))
    hidden = torch.tensor([[[1.0], [3.0], [5.0]]])
    merged = apply_plan(plan, hidden)
    assert torch.isfinite(merged).all()
    assert merged.flatten().tolist() == [2.0, 5.0]


def test_gather_time_layouts():
    plan = two_row_plan()
    batch, length, new_length = 2, 6, plan.new_length
    expected = plan.source

    positions = torch.arange(length).expand(batch, length) + 10  # (B, T)
    assert torch.equal(gather_time(plan, positions, dim=1), expected + 10)

    mrope = torch.stack([positions, positions * 2, positions * 3])  # (3, B, T)
    gathered = gather_time(plan, mrope, dim=2)
    assert gathered.shape == (3, batch, new_length)
    for plane in range(3):
        assert torch.equal(gathered[plane], (expected + 10) * (plane + 1))

    cos = torch.randn(1, length, 8)  # (1, T, d): batch axis broadcast
    gathered = gather_time(plan, cos, dim=1)
    assert gathered.shape == (batch, new_length, 8)
    assert torch.equal(gathered[1], cos[0, expected[1]])

    mask = torch.randn(batch, 1, length, length)  # (B, 1, Tq, Tk): rows then columns
    rows_cols = gather_time(plan, gather_time(plan, mask, dim=2), dim=3)
    assert rows_cols.shape == (batch, 1, new_length, new_length)
    for b in range(batch):
        assert torch.equal(rows_cols[b, 0], mask[b, 0][expected[b]][:, expected[b]])


def test_gather_time_mrope_with_batch_of_three():
    reducible = torch.ones(3, 6, dtype=torch.bool)
    plan = evict_plan(torch.randn(3, 6), reducible, torch.tensor([1, 2, 3]))
    positions = torch.arange(6).expand(3, 6)
    mrope = torch.stack([positions, positions + 100, positions + 200])  # (3, B=3, T)
    for gathered in (gather_time(plan, mrope, dim=2), gather_time(plan, mrope, dim=2, batch_dim=1)):
        for plane in range(3):
            assert torch.equal(gathered[plane], plan.source + 100 * plane)
    cos = torch.randn(3, 3, 6, 4)  # float M-RoPE table (3, B=3, T, d): ambiguous, so the axis is given
    gathered = gather_time(plan, cos, dim=2, batch_dim=1)
    for b in range(3):
        assert torch.equal(gathered[:, b], cos[:, b, plan.source[b]])


def test_gather_time_rejects_wrong_axis():
    plan = two_row_plan()
    with pytest.raises(ValueError, match="time axis"):
        gather_time(plan, torch.zeros(2, 5), dim=1)
    with pytest.raises(ValueError, match="batch"):
        gather_time(plan, torch.zeros(4, 6), dim=1)


def test_compose_plans_of_two_evictions_equals_applying_both():
    generator = torch.Generator().manual_seed(0)
    reducible = torch.ones(2, 8, dtype=torch.bool)
    reducible[:, 0] = False  # a text token at the front that both plans keep
    first = evict_plan(torch.rand(2, 8, generator=generator), reducible, torch.tensor([1, 3]))  # row 0: 2 fillers
    reducible_after = ~first.filler  # (B, T1): fillers are never reducible
    reducible_after[:, -1] = False  # and neither is the last token
    second = evict_plan(torch.rand(2, first.new_length, generator=generator), reducible_after, torch.tensor([2, 1]))
    composed = compose_plans(first, second)

    assert compose_plans(None, second) is second
    assert composed.removed.tolist() == [3, 4]
    assert (composed.batch, composed.old_length, composed.new_length) == (2, 8, second.new_length)
    hidden = torch.randn(2, 8, 5)
    torch.testing.assert_close(apply_plan(composed, hidden), apply_plan(second, apply_plan(first, hidden)))
    positions = torch.arange(8).expand(2, 8) + 100  # (B, T0)
    twice = gather_time(second, gather_time(first, positions, dim=1), dim=1)  # (B, T2)
    assert torch.equal(gather_time(composed, positions, dim=1), twice)
    for row in range(2):  # reference, token by token: final slot of every original token, -1 once evicted
        for token in range(8):
            middle = int(first.slot[row, token])
            expected = -1 if middle < 0 else int(second.slot[row, middle])
            assert int(composed.slot[row, token]) == expected
        for slot in range(composed.new_length):  # a filler of either plan stays a filler
            expected = bool(second.filler[row, slot]) or bool(first.filler[row, second.source[row, slot]])
            assert bool(composed.filler[row, slot]) == expected
    assert torch.equal(composed.weight, (composed.slot >= 0).float())


def test_compose_plans_after_a_merge_maps_every_member_to_its_final_slot():
    first = two_row_plan()  # (2, 6) -> (2, 5); row 1 has two left fillers
    reducible = ~first.filler
    second = evict_plan(torch.arange(5.0).expand(2, 5), reducible, torch.tensor([1, 1]))  # drops each row's lowest
    composed = compose_plans(first, second)
    # Row 0: slots 0,1,1,2,3,4 -> second drops slot 0 -> original token 0 gone, the merged pair 1-2 in final slot 0.
    assert composed.slot[0].tolist() == [-1, 0, 0, 1, 2, 3]
    # Row 1: second drops slot 2 (the merged tokens 0-1); first's two left fillers stay fillers.
    assert composed.slot[1].tolist() == [-1, -1, 2, 3, 3, 3]
    assert composed.source.tolist() == [[2, 3, 4, 5], [0, 0, 2, 4]]
    assert composed.filler.tolist() == [[False] * 4, [True, True, False, False]]
    assert composed.removed.tolist() == [2, 4]


@pytest.mark.parametrize("seed", range(4))
def test_the_direct_eviction_plan_equals_the_general_builder(seed):
    """``eviction_plan`` is ``plan_from_slots(keep, keep, ones)`` built without merge clusters: same plan, field by
    field, with rows that keep different numbers of tokens (fillers), every token, or none."""
    from speechtrim.ops.plan import eviction_plan

    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(5, 23, generator=generator) < 0.6
    keep[1] = True
    keep[2] = False
    keep[3, :20] = False
    expected = plan_from_slots(keep, keep, torch.ones(keep.shape))
    plan = eviction_plan(keep)
    for name in ("slot", "weight", "source", "filler", "removed"):
        assert torch.equal(getattr(plan, name), getattr(expected, name)), name
    assert plan.new_length == expected.new_length == 23


@pytest.mark.parametrize("seed", range(6))
def test_the_short_and_long_paths_of_apply_plan_give_the_same_values(seed, monkeypatch):
    """``apply_plan`` adds every token into its slot on short sequences and gathers first members plus merged ones on
    long sequences; on merges (zero-weight clusters included), evictions and left fillers both give the same values
    to the last bit, and a plan built with ``keep=None`` equals one built with every token kept."""
    from speechtrim.ops import plan as plan_module

    generator = torch.Generator().manual_seed(seed)
    batch, length, width = 3, 31, 7
    hidden = torch.randn(batch, length, width, generator=generator)
    starts = torch.rand(batch, length, generator=generator) < 0.6
    starts[:, 0] = True
    weight = torch.rand(batch, length, generator=generator)
    weight[weight < 0.3] = 0.0  # some clusters weigh nothing in total: their plain mean
    keep = torch.rand(batch, length, generator=generator) < 0.8
    keep[:, 0] = True
    merged = plan_from_slots(starts, None, weight)
    kept_all = plan_from_slots(starts, torch.ones_like(starts), weight)
    for name in ("slot", "weight", "source", "filler", "removed"):
        assert torch.equal(getattr(merged, name), getattr(kept_all, name)), name
    plans = [merged, plan_from_slots(starts, keep, weight), plan_from_slots(keep, keep, weight)]
    assert any(bool(plan.filler.any()) for plan in plans)
    for plan in plans:
        short = apply_plan(plan, hidden)
        monkeypatch.setattr(plan_module, "_SMALL_ELEMENTS", 0)
        long = apply_plan(plan, hidden)
        monkeypatch.setattr(plan_module, "_SMALL_ELEMENTS", 1 << 18)
        assert torch.equal(short, long)
        assert short.is_contiguous()


def test_the_one_row_gather_equals_the_general_gather():
    plan = merge_plan(torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0]]), torch.rand(1, 6), torch.tensor([2]))
    for tensor in (torch.arange(6)[None], torch.randn(1, 6, 4)):
        index = plan.source.view(1, -1, *([1] * (tensor.dim() - 2))).expand(1, plan.new_length, *tensor.shape[2:])
        assert torch.equal(gather_time(plan, tensor, dim=1), tensor.gather(1, index))
