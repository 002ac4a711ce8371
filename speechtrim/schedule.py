"""Per-layer merge ratios (FastAdaSP section 3.3): sparse (one layer), constant, decay, or an explicit list.

Accepted schedule forms, in the spirit of ToMe's tiny parser:
- ``"none"``: the sparse-task strategy, ``ratio`` at ``first_layer`` only.
- ``"constant"``: ``ratio`` at every layer from ``first_layer`` on.
- ``"decay"``: linear from ``ratio`` at ``first_layer`` down to exactly 0 at the model's last layer.
- ``("decay", 0.3)``: a named schedule with its own ratio (the ``ratio`` argument is then ignored).
- ``0.3``: a bare number is a constant schedule at that ratio from ``first_layer`` (``ratio`` ignored).
- ``[0, 0, 0.3, 0.3, ...]``: explicit per-layer ratios, one per layer (``ratio`` and ``first_layer`` ignored).
Each ratio applies to the audio tokens present at that layer (see :func:`speechtrim.flops.simulate_lengths`).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

from speechtrim.ratio import check_ratio

logger = logging.getLogger(__name__)

SCHEDULE_NAMES = ("none", "constant", "decay")


def layer_ratios(
    schedule: str | float | Sequence[float] | tuple[str, float], ratio: float, first_layer: int, num_layers: int
) -> list[float]:
    """Merge ratio of every decoder layer for a schedule (FastAdaSP 3.3: dense = constant/decay, sparse = none).

    Args:
        schedule: "none", "constant", "decay", a (name, ratio) pair, a number, or a list of per-layer ratios.
        ratio: merge ratio in [0, 1) used by the named schedules.
        first_layer: first reducing layer (0-based), in [0, num_layers).
        num_layers: depth of the decoder.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer (the decoder depth), got {num_layers!r}.")
    if isinstance(first_layer, bool) or not isinstance(first_layer, numbers.Integral):
        raise ValueError(f"first_layer must be an integer layer index, got {first_layer!r}.")
    if not 0 <= first_layer < num_layers:
        raise ValueError(
            f"first_layer={first_layer} is beyond the model's depth: it has {num_layers} layers, so use a layer in "
            f"0..{num_layers - 1}."
        )
    if isinstance(schedule, tuple) and len(schedule) == 2 and isinstance(schedule[0], str):
        schedule, ratio = schedule
    if isinstance(schedule, str):
        name = schedule.strip().lower()
        if name not in SCHEDULE_NAMES:
            raise ValueError(
                f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULE_NAMES)}, a number, or a list of "
                f"{num_layers} per-layer ratios."
            )
        ratio = check_ratio(ratio, "ratio")
        ratios = [0.0] * num_layers
        if name == "none":
            ratios[first_layer] = ratio
        elif name == "constant":
            ratios[first_layer:] = [ratio] * (num_layers - first_layer)
        else:
            last = num_layers - 1
            if first_layer == last and ratio > 0:
                raise ValueError(
                    f"decay from first_layer={first_layer} has no room to fall to 0 at the last layer ({last}); "
                    "start it earlier, or use the 'none' schedule to reduce at that one layer."
                )
            span = max(last - first_layer, 1)
            for layer in range(first_layer, num_layers):
                ratios[layer] = ratio * (last - layer) / span  # exactly 0.0 at the last layer
        return ratios
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
        return layer_ratios("constant", check_ratio(schedule, "schedule ratio"), first_layer, num_layers)
    if isinstance(schedule, Sequence):
        if len(schedule) != num_layers:
            raise ValueError(
                f"an explicit schedule needs one ratio per layer: got {len(schedule)} values for {num_layers} layers."
            )
        return [check_ratio(value, f"schedule[{index}]") for index, value in enumerate(schedule)]
    raise ValueError(
        f"schedule must be a name ({', '.join(SCHEDULE_NAMES)}), a number, or a list of per-layer ratios, got "
        f"{type(schedule).__name__}."
    )
