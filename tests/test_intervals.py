"""95 % bootstrap intervals over clips for the bench's metric and fidelity columns."""

import pytest

from speechtrim.eval.harness import score_interval
from speechtrim.eval.metrics import bootstrap_interval
from speechtrim.eval.text import wer, wer_counts


def test_wer_counts_add_up_to_the_corpus_wer():
    references = ["the cat sat on the mat", "hello world", ""]
    hypotheses = ["the cat sat on a mat", "hello there world", "noise"]
    edits, words = wer_counts(references, hypotheses)
    assert edits == [1, 1, 1] and words == [6, 2, 0]
    assert sum(edits) / sum(words) == pytest.approx(wer(references, hypotheses))


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_clips():
    errors, counts = [0, 1, 2, 3, 0, 1], [5, 5, 5, 5, 5, 5]
    low, high = bootstrap_interval(errors, counts)
    estimate = sum(errors) / sum(counts)
    assert low <= estimate <= high and high > low
    wide = high - low
    low, high = bootstrap_interval(errors * 10, counts * 10)
    assert high - low < wide
    assert bootstrap_interval(errors, counts) == bootstrap_interval(errors, counts)  # seeded
    assert bootstrap_interval([1], [3]) is None
    # identical clips: no spread
    assert bootstrap_interval([1, 1, 1], [2, 2, 2]) == (0.5, 0.5)


def test_score_interval_per_task():
    low, high = score_interval("emotion", ["a", "b", "a", "b"], ["a", "b", "b", "b"])
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert score_interval("asr", ["a b", "c d"], ["a b", "c d"]) == (0.0, 0.0)
    assert score_interval("translation", ["a", "b"], ["a", "b"]) is None


def test_median_interval():
    from speechtrim.eval.metrics import median_interval

    values = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.0]
    low, high = median_interval(values)
    assert low <= 1.0 <= high and low >= 0.9 and high <= 1.2
    assert median_interval(values) == median_interval(values)  # seeded
    assert median_interval([1.0, 2.0]) is None
    assert median_interval([3.0] * 5) == (3.0, 3.0)
    with pytest.raises(ValueError, match="one-dimensional"):
        median_interval([[1.0, 2.0], [3.0, 4.0]])
