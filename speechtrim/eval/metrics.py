"""Task metrics: emotion recognition (WA, UA, macro-F1), label agreement, mean ± std over folds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def classification_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """WA (overall accuracy), UA (mean per-class recall) and macro-F1 over the reference classes.

    Args:
        references: true labels.
        predictions: predicted labels, same length.
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no examples to score")
    labels = sorted(set(references))
    return {
        "wa": float(accuracy_score(references, predictions)),
        "ua": float(balanced_accuracy_score(references, predictions)),
        "macro_f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
    }


def agreement(first: Sequence[str], second: Sequence[str]) -> float:
    """Fraction of positions where two label sequences agree (fidelity of a reduced model to the full one)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"agreement needs two non-empty sequences of equal length, got {len(first)} and {len(second)}")
    return float(np.mean([a == b for a, b in zip(first, second)]))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (as papers report over folds)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std())


def bootstrap_interval(errors: Sequence[float], counts: Sequence[float], resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval over clips of a ratio of sums, sum(errors) / sum(counts).

    Resampling whole clips keeps each clip's words together, so a corpus WER's interval reflects how much the
    score depends on which clips were drawn. None when there are fewer than two clips.

    Args:
        errors: per clip, the errors (word edits, or 1 for a wrong label).
        counts: per clip, what they are counted against (reference words, or 1).
        resamples: bootstrap draws.
        seed: seed of the draws (the interval is reproducible).
        confidence: coverage of the interval.
    """
    errors_array, counts_array = np.asarray(errors, dtype=float), np.asarray(counts, dtype=float)
    if errors_array.shape != counts_array.shape:
        raise ValueError(f"{errors_array.shape} errors but {counts_array.shape} counts")
    if len(errors_array) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(errors_array), size=(resamples, len(errors_array)))
    totals = counts_array[draws].sum(axis=1)
    ratios = errors_array[draws].sum(axis=1) / np.where(totals > 0, totals, np.nan)
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def median_interval(values: Sequence[float], resamples: int = 1000, seed: int = 0, confidence: float = 0.95
                    ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the median of ``values`` (e.g. per-repeat ratios of two timings); None for
    fewer than three values.

    Args:
        values: the observations.
        resamples: bootstrap draws.
        seed: seed of the draws (the interval is reproducible).
        confidence: coverage of the interval.
    """
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {array.shape}")
    if len(array) < 3:
        return None
    draws = np.random.default_rng(seed).integers(0, len(array), size=(resamples, len(array)))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.median(array[draws], axis=1), [tail, 100 - tail])
    return float(low), float(high)
