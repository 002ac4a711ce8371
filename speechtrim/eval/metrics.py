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
