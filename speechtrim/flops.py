"""Theoretical prefill FLOPs (FastAdaSP appendix A.2, eq. 10) and solving a merge ratio for a FLOPs target.

Convention shared with the reducers: a reduction at layer l is applied to layer l's input (a forward pre-hook), so
layer l already runs on the shorter sequence. Each layer removes ``count_to_remove(audio tokens present, ratio_l)``
audio tokens, so ratios compound across layers; text tokens are never removed.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence

from speechtrim.ops.select import count_to_remove_int, removal_count_unchecked
from speechtrim.ratio import check_ratio
from speechtrim.schedule import layer_ratios

logger = logging.getLogger(__name__)


def layer_flops(n: float, d: int, m: int) -> float:
    """FLOPs of one decoder layer on n tokens: ``2 n^2 d + 4 n d^2 + 2 n d m`` (FastAdaSP eq. 10).

    Args:
        n: sequence length at that layer.
        d: hidden size.
        m: feed-forward (intermediate) size.
    """
    return 2 * n * n * d + 4 * n * d * d + 2 * n * d * m


def _flatten(lengths: Iterable) -> list:
    """Lengths of every (layer, row): accepts per-layer numbers or per-layer sequences of per-row numbers."""
    if hasattr(lengths, "tolist"):  # a tensor or an array
        lengths = lengths.tolist()
        if not isinstance(lengths, list):
            return [lengths]
    flat = []
    for item in lengths:
        if hasattr(item, "tolist") or (isinstance(item, Iterable) and not isinstance(item, (str, bytes))):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def prefill_flops(lengths_per_layer: Sequence, d: int, m: int) -> float:
    """Total prefill FLOPs: eq. 10 summed over the sequence length each layer processed.

    Args:
        lengths_per_layer: sequence length at each layer, e.g. [120, 120, 90, ...]; an entry may also be a list of
            per-row lengths of a batch, which are summed.
        d: hidden size.
        m: feed-forward (intermediate) size.
    """
    return sum(layer_flops(n, d, m) for n in _flatten(lengths_per_layer))


def flops_reduction(base_lengths: Sequence, reduced_lengths: Sequence, d: int, m: int) -> float:
    """Fraction of prefill FLOPs saved: ``1 - flops(reduced) / flops(base)``.

    Args:
        base_lengths: per-layer lengths of the unreduced model.
        reduced_lengths: per-layer lengths the reducer produced.
        d: hidden size.
        m: feed-forward (intermediate) size.
    """
    base = prefill_flops(base_lengths, d, m)
    if base <= 0:
        raise ValueError("base_lengths give zero FLOPs; pass the per-layer lengths of a non-empty prompt.")
    return 1.0 - prefill_flops(reduced_lengths, d, m) / base


def simulate_lengths(
    num_text: int, num_audio: int, schedule: str | float | Sequence[float], ratio: float, first_layer: int,
    num_layers: int,
) -> list[int]:
    """Sequence length at every layer for one prompt of ``num_text`` text and ``num_audio`` audio tokens.

    Uses the same rounding as :func:`speechtrim.ops.select.count_to_remove` and assumes one audio span.

    Args:
        num_text: tokens never reduced (text, special tokens).
        num_audio: audio tokens entering the decoder.
        schedule: as in :func:`speechtrim.schedule.layer_ratios`.
        ratio: merge ratio for named schedules.
        first_layer: first reducing layer.
        num_layers: decoder depth.
    """
    if num_text < 0 or num_audio < 0:
        raise ValueError(f"token counts must be non-negative, got num_text={num_text}, num_audio={num_audio}.")
    audio = int(num_audio)
    lengths = []
    for layer_ratio in layer_ratios(schedule, ratio, first_layer, num_layers):
        if layer_ratio > 0:
            audio -= count_to_remove_int(audio, layer_ratio)
        lengths.append(int(num_text) + audio)
    return lengths


def _schedule_flops(num_text: int, num_audio: int, ratios: list[float], d: int, m: int) -> int:
    """``prefill_flops(simulate_lengths(...))`` for one prompt, in exact integers, with no per-layer argument
    checks (the bisection of ``solve_ratio`` calls it about a hundred times per prompt)."""
    audio, total = num_audio, 0
    for layer_ratio in ratios:
        if layer_ratio > 0:
            audio -= removal_count_unchecked(audio, layer_ratio)
        total += layer_flops(num_text + audio, d, m)
    return total


class TargetUnreachable(ValueError):
    """A FLOPs-reduction target that a schedule cannot reach on a prompt (the bench shows it as '—')."""


def solve_ratio(
    target_reduction: float, num_text: int, num_audio: int, schedule: str, first_layer: int, num_layers: int,
    d: int, m: int, tolerance: float = 1e-9,
) -> float:
    """Merge ratio whose simulated per-layer lengths cut prefill FLOPs by ``target_reduction`` (bisection).

    Token counts are integers, so the reduction is a step function of the ratio; the ratio returned gives the
    reachable reduction closest to the target (ties: the smaller ratio).

    Args:
        target_reduction: wanted fraction of prefill FLOPs saved, in [0, 1).
        num_text: tokens never reduced.
        num_audio: audio tokens entering the decoder.
        schedule: a schedule name ("none", "constant", "decay").
        first_layer: first reducing layer.
        num_layers: decoder depth.
        d: hidden size.
        m: feed-forward (intermediate) size.
        tolerance: bisection stops when the ratio interval is narrower than this.
    """
    check_ratio(target_reduction, "target_reduction")
    if not isinstance(schedule, str):
        raise ValueError(
            "solve_ratio scales a named schedule ('none', 'constant', 'decay'); for an explicit list of ratios "
            "compute flops_reduction(simulate_lengths(...)) directly."
        )
    if num_text < 0 or num_audio < 0:
        raise ValueError(f"token counts must be non-negative, got num_text={num_text}, num_audio={num_audio}.")
    layer_ratios(schedule, 0.5, first_layer, num_layers)  # validates the schedule, the layer and the depth
    return _solve_ratio(float(target_reduction), int(num_text), int(num_audio), schedule, first_layer, num_layers,
                        int(d), int(m), float(tolerance))


@functools.lru_cache(maxsize=4096)
def _solve_ratio(target_reduction: float, num_text: int, num_audio: int, schedule: str, first_layer: int,
                 num_layers: int, d: int, m: int, tolerance: float) -> float:
    """``solve_ratio`` past its checks; cached, as prompts of one shape (a batch's rows, repeated clips, a
    benchmark's repeats) ask the same question."""
    base = _schedule_flops(num_text, num_audio, [0.0] * num_layers, d, m)
    if base <= 0:
        raise ValueError("base_lengths give zero FLOPs; pass the per-layer lengths of a non-empty prompt.")

    def reduction(ratio: float) -> float:  # flops_reduction(base, simulate_lengths(...)), without the checks
        return 1.0 - _schedule_flops(num_text, num_audio, layer_ratios(schedule, ratio, first_layer, num_layers),
                                     d, m) / base

    if target_reduction == 0:
        return 0.0
    most = reduction(math.nextafter(1.0, 0.0))
    if most < target_reduction:
        raise TargetUnreachable(
            f"a {target_reduction:.1%} FLOPs reduction is unreachable with schedule {schedule!r} from layer "
            f"{first_layer} of {num_layers} ({num_audio} audio + {num_text} text tokens): the most it can cut is "
            f"{most:.1%}. Lower the target, start at an earlier layer, or use a denser schedule."
        )

    def first_ratio(predicate, low: float, high: float) -> tuple[float, float]:
        """Bracket (low, high] of the first ratio where predicate(reduction) holds; it fails at low, holds at high."""
        while high - low > tolerance:
            middle = (low + high) / 2
            if predicate(reduction(middle)):
                high = middle
            else:
                low = middle
        return low, high

    top = math.nextafter(1.0, 0.0)
    last_short, first_enough = first_ratio(lambda value: value >= target_reduction, 0.0, top)
    below, above = reduction(last_short), reduction(first_enough)
    level = below if target_reduction - below <= above - target_reduction else above
    # Return the middle of the ratio interval that gives `level`, away from rounding edges.
    start = 0.0 if level == 0.0 else first_ratio(lambda value: value >= level, 0.0, top)[1]
    end = top if reduction(top) <= level else first_ratio(lambda value: value > level, start, top)[0]
    chosen = (start + end) / 2
    logger.debug("solve_ratio: target %.4f -> ratio %.6f (reduction %.4f)", target_reduction, chosen, level)
    return chosen


def compute_layer_flops(n: float, linear_weights: int, attention_width: int) -> float:
    """FLOPs (two per multiply-add) a decoder layer really does on n tokens in a causal prefill.

    Every linear weight once per token, ``2 n W``, and the two attention products over the causal triangle,
    ``2 * 2 * (h d_h) * n (n + 1) / 2``, which is what an SDPA kernel that skips the masked blocks computes. For a
    Llama layer W = 2 d^2 + 2 d d_kv + 3 d m (query and output projections, the narrower key and value projections of
    grouped-query attention, the gated MLP's three matrices): FastAdaSP's eq. 10 (``layer_flops``), written for a
    two-matrix MLP and counting its projections once per multiply-add, gives the linear part less than half of this
    weight (SmolLM2-135M: 3.1 M against 7.1 M FLOPs per token), so at long prompts it predicts more of the saving
    from the quadratic attention term than the layer can deliver. Norms, rotary embeddings and activations are left
    out (a few per cent).

    Args:
        n: sequence length at that layer.
        linear_weights: weights of the layer's linear maps (``linear_weights``).
        attention_width: query heads times head width.
    """
    return 2.0 * n * linear_weights + 2.0 * attention_width * n * (n + 1)


def linear_weights(layer: object) -> int:
    """Weights of every ``torch.nn.Linear`` inside one decoder layer (each is used once per token; a mixture of
    experts would be over-counted: all of its experts are included)."""
    from torch import nn

    return sum(module.weight.numel() for module in layer.modules() if isinstance(module, nn.Linear))


def compute_flops_reduction(base_lengths: Sequence[int], reduced_lengths: Sequence[int],
                            weights_per_layer: Sequence[int], attention_width: int) -> float:
    """Fraction of the compute FLOPs (``compute_layer_flops``) saved: the speed-up a prefill can reach if every
    layer runs at the same FLOP rate on any length, ``1 / (1 - saved)``.

    Args:
        base_lengths: per-layer lengths of the unreduced prefill (one prompt).
        reduced_lengths: per-layer lengths the reducer produced.
        weights_per_layer: ``linear_weights`` of each layer.
        attention_width: query heads times head width.
    """
    if not len(base_lengths) == len(reduced_lengths) == len(weights_per_layer):
        raise ValueError(f"need one length and one weight count per layer, got {len(base_lengths)} base lengths, "
                         f"{len(reduced_lengths)} reduced lengths and {len(weights_per_layer)} weight counts")

    def total(lengths: Sequence[int]) -> float:
        return sum(compute_layer_flops(n, w, attention_width) for n, w in zip(lengths, weights_per_layer))

    base = total(base_lengths)
    if base <= 0:
        raise ValueError("base_lengths give zero FLOPs; pass the per-layer lengths of a non-empty prompt.")
    return 1.0 - total(reduced_lengths) / base
