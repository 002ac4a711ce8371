"""Per-layer merge-ratio schedules (FastAdaSP sec. 3.3)."""

import pytest

from speechtrim.schedule import layer_ratios


def test_none_is_one_layer_only():
    assert layer_ratios("none", 0.4, 2, 5) == [0.0, 0.0, 0.4, 0.0, 0.0]


def test_constant_from_first_layer():
    assert layer_ratios("constant", 0.2, 1, 4) == [0.0, 0.2, 0.2, 0.2]
    assert layer_ratios(0.2, 0.0, 1, 4) == [0.0, 0.2, 0.2, 0.2]  # a bare number is a constant schedule
    assert layer_ratios(("decay", 0.3), 0.0, 0, 4) == layer_ratios("decay", 0.3, 0, 4)


@pytest.mark.parametrize("depth", [4, 24, 30, 32])
@pytest.mark.parametrize("first", [0, 1, 2])
def test_decay_is_linear_and_reaches_zero_at_the_last_layer(depth, first):
    ratios = layer_ratios("decay", 0.3, first, depth)
    assert len(ratios) == depth
    assert ratios[:first] == [0.0] * first
    assert ratios[first] == pytest.approx(0.3)
    assert ratios[-1] == 0.0
    steps = [ratios[layer] - ratios[layer + 1] for layer in range(first, depth - 1)]
    assert all(step == pytest.approx(0.3 / (depth - 1 - first)) for step in steps)


def test_explicit_list_is_validated():
    assert layer_ratios([0, 0.1, 0.2], 0.9, 0, 3) == [0.0, 0.1, 0.2]
    with pytest.raises(ValueError, match="one ratio per layer"):
        layer_ratios([0.1, 0.2], 0.3, 0, 3)
    with pytest.raises(ValueError, match=r"schedule\[1\]"):
        layer_ratios([0.1, 1.0, 0.2], 0.3, 0, 3)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("constant", 1.0, 0, 4), r"ratio must be a number in \[0, 1\)"),
        (("constant", -0.1, 0, 4), r"ratio must be a number in \[0, 1\)"),
        (("constant", 0.3, 4, 4), "beyond the model's depth"),
        (("constant", 0.3, -1, 4), "beyond the model's depth"),
        (("linear", 0.3, 0, 4), "unknown schedule 'linear'; use one of none, constant, decay"),
        (("decay", 0.3, 3, 4), "no room to fall to 0"),
    ],
)
def test_errors_say_how_to_fix(arguments, message):
    with pytest.raises(ValueError, match=message):
        layer_ratios(*arguments)
