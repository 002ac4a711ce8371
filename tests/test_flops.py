"""Theoretical FLOPs (FastAdaSP eq. 10, appendix A.2) and solving a ratio for a FLOPs target."""

import pytest
import torch

from speechtrim.flops import flops_reduction, layer_flops, prefill_flops, simulate_lengths, solve_ratio


def test_layer_flops_by_hand():
    # n=10, d=4, m=8: 2*100*4 + 4*10*16 + 2*10*4*8 = 800 + 640 + 640
    assert layer_flops(10, 4, 8) == 2080
    assert prefill_flops([10, 10, 5], 4, 8) == 2080 * 2 + (2 * 25 * 4 + 4 * 5 * 16 + 2 * 5 * 4 * 8)
    assert prefill_flops([[10, 5], [10, 5]], 4, 8) == 2 * (2080 + 840)  # per-row lengths of a batch are summed
    assert prefill_flops(torch.tensor([[10, 5], [10, 5]]), 4, 8) == 2 * (2080 + 840)  # tensors work too


def test_single_layer_rate_matches_the_paper_closed_form():
    # A.2: reducing every layer by k gives Rate = k + (k - k^2) / (1 + (2d + m) / n).
    n, d, m, k = 1000, 64, 256, 0.3
    rate = flops_reduction([n], [n * (1 - k)], d, m)
    assert rate == pytest.approx(k + (k - k * k) / (1 + (2 * d + m) / n))


def test_simulated_lengths_follow_the_schedule():
    assert simulate_lengths(10, 100, "none", 0.3, 1, 4) == [110, 80, 80, 80]
    assert simulate_lengths(10, 100, "constant", 0.5, 2, 4) == [110, 110, 60, 35]  # 50 removed, then 25
    assert simulate_lengths(10, 100, "decay", 0.3, 0, 4) == [80, 66, 60, 60]  # ratios .3 .2 .1 0: remove 30, 14, 5.6->6
    assert simulate_lengths(3, 4, "constant", 0.9, 0, 3) == [4, 4, 4]  # one audio token always survives


@pytest.mark.parametrize("schedule, first", [("none", 2), ("constant", 2), ("decay", 0), ("decay", 3)])
@pytest.mark.parametrize("target", [0.1, 0.3, 0.45])
def test_solve_ratio_hits_the_target(schedule, first, target):
    text, audio, layers, d, m = 30, 1500, 24, 512, 1408
    ratio = solve_ratio(target, text, audio, schedule, first, layers, d, m)
    assert 0.0 < ratio < 1.0
    base = simulate_lengths(text, audio, schedule, 0.0, first, layers)
    reduced = simulate_lengths(text, audio, schedule, ratio, first, layers)
    assert flops_reduction(base, reduced, d, m) == pytest.approx(target, abs=2e-3)


def test_solve_ratio_unreachable_says_the_maximum():
    with pytest.raises(ValueError, match=r"unreachable.*the most it can cut is \d+\.\d%"):
        solve_ratio(0.6, 100, 50, "none", 20, 24, 64, 256)
    assert solve_ratio(0.0, 100, 50, "none", 20, 24, 64, 256) == 0.0


@pytest.mark.parametrize("schedule", ["none", "constant", "decay"])
def test_the_solvers_integer_flops_equal_the_public_simulation(schedule):
    """``solve_ratio`` bisects on ``_schedule_flops``: it must give exactly ``prefill_flops(simulate_lengths(...))``
    (same rounding, same integers) for every ratio it may try, or the solved ratios would drift."""
    import random

    from speechtrim.flops import _schedule_flops, prefill_flops, simulate_lengths
    from speechtrim.schedule import layer_ratios

    rng = random.Random(0)
    for _ in range(300):
        text, audio, depth = rng.randint(0, 80), rng.randint(0, 4000), rng.randint(2, 40)
        first = rng.randint(0, depth - 2)
        ratio = rng.choice([rng.random(), 0.5, 1 / 3, 0.0, 0.999999])
        expected = prefill_flops(simulate_lengths(text, audio, schedule, ratio, first, depth), 576, 1536)
        got = _schedule_flops(text, audio, layer_ratios(schedule, ratio, first, depth), 576, 1536)
        assert got == expected and isinstance(got, int)


def test_solve_ratio_answers_repeated_questions_from_its_cache_and_still_checks_arguments():
    from speechtrim.flops import _solve_ratio

    _solve_ratio.cache_clear()
    first = solve_ratio(0.3, 23, 50, "constant", 6, 30, 576, 1536)
    assert solve_ratio(0.3, 23, 50, "constant", 6, 30, 576, 1536) == first
    assert _solve_ratio.cache_info().hits == 1
    with pytest.raises(ValueError, match="first_layer=30 is beyond the model's depth"):
        solve_ratio(0.3, 23, 50, "constant", 30, 30, 576, 1536)
    with pytest.raises(ValueError, match="token counts must be non-negative"):
        solve_ratio(0.3, -1, 50, "constant", 6, 30, 576, 1536)


def test_compute_flops_count_every_weight_and_the_causal_attention():
    """The compute ideal of a Llama layer: 2 n W with W = 2 d^2 + 2 d d_kv + 3 d m, plus 2 (h d_h) n (n + 1)."""
    from speechtrim.flops import compute_flops_reduction, compute_layer_flops, linear_weights
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    d, m, kv = 64, 128, 2 * 16  # hidden, MLP width, 2 KV heads of width 16
    weights = linear_weights(model.model.layers[0])
    assert weights == 2 * d * d + 2 * d * kv + 3 * d * m
    assert compute_layer_flops(10, weights, d) == 2 * 10 * weights + 2 * d * 10 * 11
    # halving every layer's tokens saves more than half of the attention, exactly half of the linear maps
    saved = compute_flops_reduction([100] * 4, [50] * 4, [weights] * 4, d)
    linear, attention = 2 * 100 * weights, 2 * d * 100 * 101
    expected = 1 - (linear / 2 + 2 * d * 50 * 51) / (linear + attention)
    assert saved == pytest.approx(expected) and saved > 0.5
    # SmolLM2-135M's shapes at 3,000 tokens, half of them removed from layer 6 of 30: eq. 10 promises 2x,
    # the compute count 1.85x (its linear part is 2.3x eq. 10's)
    smol = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    base, reduced = [3023] * 30, [3023] * 6 + [1534] * 24
    assert 1 / (1 - flops_reduction(base, reduced, 576, 1536)) == pytest.approx(2.0, abs=0.03)
    assert 1 / (1 - compute_flops_reduction(base, reduced, [smol] * 30, 576)) == pytest.approx(1.85, abs=0.01)
    with pytest.raises(ValueError, match="one length and one weight count per layer"):
        compute_flops_reduction([10, 10], [5], [weights] * 2, d)
    with pytest.raises(ValueError, match="zero FLOPs"):
        compute_flops_reduction([0], [0], [weights], d)
