"""The one check of a ratio option (``ratio``, ``flops_reduction``, a schedule's entries): a number in [0, 1)."""

from __future__ import annotations

import numbers


def check_ratio(value: object, what: str = "ratio") -> float:
    """``value`` as a float in [0, 1), or a ValueError that names ``what`` and gives an example.

    Args:
        value: the number to check (bools and non-numbers are refused).
        what: the option's name, for the message.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}; e.g. 0.3 removes 30% of the audio "
                         "tokens (or saves 30% of prefill FLOPs for flops_reduction)")
    return float(value)


__all__ = ["check_ratio"]
