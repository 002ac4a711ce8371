"""Vectorised adjacent merge vs a plain loop written from the FastAdaSP paper (sec. 3.2, A.3), plus properties."""

import math

import pytest
import torch

from speechtrim.ops import (
    adjacent_similarity,
    apply_plan,
    flatten_heads,
    merge_plan,
)


def random_layout(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """span_id (B, T): left padding, then text and audio segments; several audio spans per row, numbered per row."""
    span_id = torch.full((batch, length), -1, dtype=torch.long)
    for row in range(batch):
        position = int(torch.randint(0, 4, (1,), generator=generator))  # left padding
        span = 0
        while position < length:
            size = int(torch.randint(1, 12, (1,), generator=generator))
            if bool(torch.rand(1, generator=generator) < 0.6):  # an audio span
                span_id[row, position:position + size] = span
                span += 1
            position += size + int(torch.randint(0, 3, (1,), generator=generator))  # text in between
    return span_id


def reference_merge(hidden, similarity, weights, num_merges, chain):
    """Per row: top-k adjacent pairs, walk the sorted indices into clusters, weighted mean per cluster (eq. 6)."""
    batch, length, _ = hidden.shape
    rows, slots, sources = [], [], []
    for b in range(batch):
        pairs = [i for i in range(length - 1) if math.isfinite(float(similarity[b, i]))]
        ordered = sorted(pairs, key=lambda i: (-float(similarity[b, i]), i))
        k = int(num_merges[b])
        if chain:
            picked = ordered[:k]
        else:  # greedy: skip pairs that touch an already picked token
            picked, used = [], set()
            for i in ordered:
                if len(picked) == k:
                    break
                if i not in used and i + 1 not in used:
                    picked.append(i)
                    used.update((i, i + 1))
        clusters = []
        for i in sorted(picked):
            if clusters and clusters[-1][-1] == i:
                clusters[-1].append(i + 1)
            else:
                clusters.append([i, i + 1])
        starts = {cluster[0]: cluster for cluster in clusters}
        out, slot, source = [], [0] * length, []
        token = 0
        while token < length:
            members = starts.get(token, [token])
            w = torch.stack([weights[b, j] for j in members])
            a = torch.stack([hidden[b, j] for j in members])
            out.append((w[:, None] * a).sum(0) / w.sum())
            best = max(members, key=lambda j: (float(weights[b, j]), -j))
            source.append(best)
            for j in members:
                slot[j] = len(out) - 1
            token = members[-1] + 1
        rows.append(out)
        slots.append(slot)
        sources.append(source)
    new_length = max(len(out) for out in rows)
    merged = torch.zeros(batch, new_length, hidden.shape[2], dtype=hidden.dtype)
    slot_t = torch.zeros(batch, length, dtype=torch.long)
    source_t = torch.zeros(batch, new_length, dtype=torch.long)
    filler = torch.zeros(batch, new_length, dtype=torch.bool)
    for b in range(batch):
        pad = new_length - len(rows[b])
        filler[b, :pad] = True
        merged[b, pad:] = torch.stack(rows[b])
        merged[b, :pad] = hidden[b, 0]
        slot_t[b] = torch.tensor(slots[b]) + pad
        source_t[b, pad:] = torch.tensor(sources[b])
    return merged, slot_t, source_t, filler


@pytest.mark.parametrize("short_path", [True, False])  # apply_plan's path for short sequences, or the long one
@pytest.mark.parametrize("chain", [True, False])
def test_merge_matches_paper_loop(chain, short_path, monkeypatch):
    from speechtrim.ops import plan as plan_module

    if not short_path:
        monkeypatch.setattr(plan_module, "_SMALL_ELEMENTS", 0)
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        batch = int(torch.randint(2, 5, (1,), generator=generator))
        length = int(torch.randint(8, 48, (1,), generator=generator))
        span_id = random_layout(generator, batch, length)
        keys = torch.randn(batch, length, 6, generator=generator)
        hidden = torch.randn(batch, length, 5, generator=generator, dtype=torch.float64)
        weights = torch.rand(batch, length, generator=generator, dtype=torch.float64) + 0.05
        num_audio = (span_id >= 0).sum(1)
        num_merges = (torch.rand(batch, generator=generator) * (num_audio + 3).double()).long()
        similarity = adjacent_similarity(keys, span_id)

        plan = merge_plan(similarity, weights, num_merges, chain=chain)
        merged = apply_plan(plan, hidden)
        expected, slot, source, filler = reference_merge(hidden, similarity, weights, num_merges, chain)

        assert torch.equal(plan.slot, slot), seed
        assert torch.equal(plan.filler, filler), seed
        assert torch.equal(plan.source, source), seed
        assert merged.shape == expected.shape
        torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)
        assert torch.equal(plan.removed, length - (~filler).sum(1))


def test_adjacent_similarity_is_cosine_of_neighbours_and_respects_spans():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 9, 4, generator=generator)  # (B, H, T, d)
    span_id = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1, -1], [0, 0, 0, 0, 0, 1, 1, 1, -1]])
    similarity = adjacent_similarity(keys, span_id)
    flat = flatten_heads(keys)
    assert flat.shape == (2, 9, 12)
    for b in range(2):
        for i in range(8):
            same = span_id[b, i] == span_id[b, i + 1] and span_id[b, i] >= 0
            if same:
                cosine = torch.dot(flat[b, i], flat[b, i + 1]) / (flat[b, i].norm() * flat[b, i + 1].norm())
                assert torch.isclose(similarity[b, i], cosine, atol=1e-6)
            else:
                assert similarity[b, i] == float("-inf")


def test_ratio_zero_is_identity():
    generator = torch.Generator().manual_seed(1)
    span_id = random_layout(generator, 3, 30)
    hidden = torch.randn(3, 30, 7, generator=generator)
    similarity = adjacent_similarity(torch.randn(3, 30, 4, generator=generator), span_id)
    plan = merge_plan(similarity, torch.rand(3, 30, generator=generator), torch.zeros(3, dtype=torch.long))
    assert plan.new_length == 30
    assert torch.equal(plan.slot, torch.arange(30).expand(3, 30))
    assert torch.equal(apply_plan(plan, hidden), hidden)


@pytest.mark.parametrize("chain", [True, False])
def test_text_and_padding_never_merge(chain):
    generator = torch.Generator().manual_seed(2)
    span_id = random_layout(generator, 4, 40)
    similarity = adjacent_similarity(torch.randn(4, 40, 4, generator=generator), span_id)
    plan = merge_plan(similarity, torch.ones(4, 40), torch.full((4,), 100), chain=chain)
    for b in range(4):
        slots = plan.slot[b]
        for token in range(40):
            shared = (slots == slots[token]).nonzero().flatten()
            if span_id[b, token] < 0:
                assert shared.tolist() == [token]  # alone in its slot
            else:
                assert (span_id[b, shared] == span_id[b, token]).all()  # merges stay inside one span


def test_uniform_weights_give_plain_mean():
    hidden = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    similarity = torch.tensor([[0.9, 0.8, 0.1, float("-inf"), 0.2]])
    plan = merge_plan(similarity, torch.ones(1, 6), torch.tensor([2]))
    merged = apply_plan(plan, hidden)
    torch.testing.assert_close(merged[0, 0], hidden[0, :3].mean(0))
    torch.testing.assert_close(merged[0, 1:], hidden[0, 3:])
    assert plan.source[0].tolist() == [0, 3, 4, 5]  # ties go to the first member


def test_chain_false_never_shares_a_token_and_removes_k():
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        span_id = random_layout(generator, 3, 50)
        similarity = adjacent_similarity(torch.randn(3, 50, 4, generator=generator), span_id)
        num_merges = torch.randint(0, 15, (3,), generator=generator)
        plan = merge_plan(similarity, torch.ones(3, 50), num_merges, chain=False)
        for b in range(3):
            sizes = torch.bincount(plan.slot[b])
            assert int(sizes.max()) <= 2
            possible = int(torch.isfinite(similarity[b]).sum())
            assert int(plan.removed[b]) <= min(int(num_merges[b]), possible)


def test_short_spans_report_what_was_merged():
    span_id = torch.tensor([[0, 0, -1, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    similarity = adjacent_similarity(torch.randn(2, 6, 3), span_id)
    plan = merge_plan(similarity, torch.ones(2, 6), torch.tensor([5, 3]))
    assert plan.removed.tolist() == [2, 3]
    assert plan.new_length == 4
    assert plan.filler.tolist() == [[False] * 4, [True, False, False, False]]  # row 1 removed one more


def test_half_precision_merge_is_finite_and_close():
    generator = torch.Generator().manual_seed(3)
    span_id = random_layout(generator, 2, 32)
    hidden = torch.randn(2, 32, 8, generator=generator)
    similarity = adjacent_similarity(torch.randn(2, 32, 4, generator=generator).to(torch.bfloat16), span_id)
    plan = merge_plan(similarity, torch.rand(2, 32, generator=generator), torch.tensor([5, 9]))
    low = apply_plan(plan, hidden.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), apply_plan(plan, hidden), rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="similarity"):
        merge_plan(torch.zeros(1, 3), torch.ones(1, 5), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-negative"):
        merge_plan(torch.zeros(1, 4), -torch.ones(1, 5), torch.tensor([1]))
    with pytest.raises(ValueError, match="num_merges"):
        merge_plan(torch.zeros(2, 4), torch.ones(2, 5), torch.tensor([1]))


@pytest.mark.parametrize("chain", [True, False])
def test_monotone_and_tied_similarities_match_the_loop(chain):
    # A strictly rising similarity is the greedy worst case (one pick per round); ties must go to the lower index.
    rising = torch.linspace(0.0, 1.0, 29).unsqueeze(0)
    tied = torch.tensor([[0.5, 0.5, 0.5, 0.9, 0.9, 0.5, 0.5, 0.5, float("-inf"), 0.5, 0.5]])
    for similarity in (rising, tied):
        length = similarity.shape[1] + 1
        hidden = torch.randn(1, length, 3, dtype=torch.float64)
        for k in range(length):
            plan = merge_plan(similarity, torch.ones(1, length, dtype=torch.float64), torch.tensor([k]), chain=chain)
            expected, slot, _, _ = reference_merge(hidden, similarity, torch.ones(1, length, dtype=torch.float64),
                                                   torch.tensor([k]), chain)
            assert torch.equal(plan.slot, slot), k
            torch.testing.assert_close(apply_plan(plan, hidden), expected)
