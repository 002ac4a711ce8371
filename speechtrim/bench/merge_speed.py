"""Benchmark: vectorised adjacent merge (merge_plan + apply_plan) vs a paper-style per-row Python loop.

FastAdaSP (appendix A.3) runs its merge once per batch row and walks the merge index list in Python. This script
times that style against :mod:`speechtrim.ops` on the same inputs, checks they agree, prints a table for people
and ends with one JSON line for machines. Run: ``python -m speechtrim.bench.merge_speed [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from speechtrim.ops import apply_plan, count_to_remove, merge_plan
from speechtrim.reducers.random_merge import random_pair_scores

logger = logging.getLogger(__name__)

DEFAULT_SIZES = ((8, 1500, 4096), (4, 300, 1024))  # (batch, audio tokens, width)


def paper_loop_merge(
    hidden: torch.Tensor, similarity: torch.Tensor, weights: torch.Tensor, num_merges: torch.Tensor
) -> torch.Tensor:
    """Per-row loop in the style of FastAdaSP Algorithm 1: top-k pairs, walk them into clusters, weighted means.

    Args:
        hidden: (B, T, D) hidden states.
        similarity: (B, T-1) adjacent-pair scores, -inf where pairs may not merge.
        weights: (B, T) merge weights.
        num_merges: (B,) pairs to merge per row.
    """
    rows = []
    for row in range(hidden.shape[0]):
        valid = int(torch.isfinite(similarity[row]).sum())
        picked = torch.topk(similarity[row], min(int(num_merges[row]), valid)).indices
        clusters: list[list[int]] = []
        for index in sorted(picked.tolist()):  # walk the merge index list, chaining consecutive indices
            if clusters and clusters[-1][1] == index:
                clusters[-1][1] = index + 1
            else:
                clusters.append([index, index + 1])
        pieces, done = [], 0
        for start, end in clusters:
            if start > done:
                pieces.append(hidden[row, done:start])  # untouched tokens
            cluster_weights = weights[row, start:end + 1].unsqueeze(1)
            merged = (cluster_weights * hidden[row, start:end + 1]).sum(0) / cluster_weights.sum()
            pieces.append(merged.unsqueeze(0))
            done = end + 1
        pieces.append(hidden[row, done:])
        rows.append(torch.cat(pieces))
    new_length = max(row.shape[0] for row in rows)
    padded = [torch.cat([row[:1].expand(new_length - row.shape[0], -1), row]) for row in rows]  # left fillers
    return torch.stack(padded)  # (B, T_new, D)


def vectorised_merge(
    hidden: torch.Tensor, similarity: torch.Tensor, weights: torch.Tensor, num_merges: torch.Tensor
) -> torch.Tensor:
    """The library path: plan the merge for the whole batch, then apply it.

    Args:
        hidden: (B, T, D) hidden states.
        similarity: (B, T-1) adjacent-pair scores.
        weights: (B, T) merge weights.
        num_merges: (B,) pairs to merge per row.
    """
    return apply_plan(merge_plan(similarity, weights, num_merges), hidden)


def time_pair(
    first: Callable[[], object], second: Callable[[], object], warmup: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum wall time of two calls, timed alternately so that machine load hits both alike.

    Args:
        first: one call to time.
        second: the other call.
        warmup: untimed calls of each first.
        repeats: timed calls of each.
    """
    for _ in range(warmup):
        first()
        second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            function()
            bucket.append(time.perf_counter() - start)
    return tuple({"median_s": statistics.median(bucket), "min_s": min(bucket)} for bucket in times)


def make_inputs(batch: int, audio_tokens: int, width: int, ratio: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Left-padded rows whose audio lengths differ, with a few text tokens after the audio.

    Args:
        batch: rows.
        audio_tokens: audio tokens of the longest row.
        width: hidden size.
        ratio: merge ratio.
        seed: random seed.
    """
    generator = torch.Generator().manual_seed(seed)
    text = 16
    length = audio_tokens + text
    span_id = torch.full((batch, length), -1, dtype=torch.long)
    num_audio = torch.tensor([audio_tokens - (row * audio_tokens) // (4 * batch) for row in range(batch)])
    for row in range(batch):
        pad = audio_tokens - int(num_audio[row])
        span_id[row, pad:pad + int(num_audio[row])] = 0
    hidden = torch.randn(batch, length, width, generator=generator)
    similarity = random_pair_scores(span_id, seed, layer=0)  # the draw random_merge really merges by
    weights = torch.rand(batch, length, generator=generator) + 0.01
    return hidden, similarity, weights, count_to_remove(num_audio, ratio)


def run(sizes: Sequence[tuple[int, int, int]], ratio: float, warmup: int, repeats: int, seed: int) -> list[dict]:
    """Time both merges at every size and check that they agree.

    Args:
        sizes: (batch, audio tokens, width) triples.
        ratio: merge ratio.
        warmup: untimed calls per measurement.
        repeats: timed calls per measurement.
        seed: random seed.
    """
    results = []
    for batch, audio_tokens, width in sizes:
        hidden, similarity, weights, num_merges = make_inputs(batch, audio_tokens, width, ratio, seed)
        fast = vectorised_merge(hidden, similarity, weights, num_merges)
        slow = paper_loop_merge(hidden, similarity, weights, num_merges)
        difference = float((fast - slow).abs().max()) if fast.shape == slow.shape else float("inf")
        vector_time, loop_time = time_pair(
            lambda: vectorised_merge(hidden, similarity, weights, num_merges),
            lambda: paper_loop_merge(hidden, similarity, weights, num_merges),
            warmup, repeats,
        )
        results.append({
            "batch": batch, "audio_tokens": audio_tokens, "width": width, "ratio": ratio,
            "merged_per_row": num_merges.tolist(),
            "vectorised_median_s": vector_time["median_s"], "vectorised_min_s": vector_time["min_s"],
            "loop_median_s": loop_time["median_s"], "loop_min_s": loop_time["min_s"],
            "speedup_median": loop_time["median_s"] / vector_time["median_s"],
            "speedup_min": loop_time["min_s"] / vector_time["min_s"],
            "max_abs_diff": difference,
        })
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print a table and one JSON line.

    Args:
        argv: command-line arguments (default: sys.argv).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3, help="merge ratio of audio tokens")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the small size")
    arguments = parser.parse_args(argv)
    sizes = DEFAULT_SIZES[1:] if arguments.quick else DEFAULT_SIZES
    results = run(sizes, arguments.ratio, arguments.warmup, arguments.repeats, arguments.seed)
    header = (f"{'batch':>5} {'tokens':>6} {'width':>5} {'vectorised ms':>13} {'loop ms':>9} {'speedup':>7} "
              f"{'(min)':>7} {'max diff':>9}")
    print(f"median of {arguments.repeats} alternating runs after {arguments.warmup} warm-up; ratio {arguments.ratio}")
    print(header)
    for item in results:
        print(
            f"{item['batch']:>5} {item['audio_tokens']:>6} {item['width']:>5} "
            f"{item['vectorised_median_s'] * 1e3:>13.1f} {item['loop_median_s'] * 1e3:>9.1f} "
            f"{item['speedup_median']:>6.1f}x {item['speedup_min']:>6.1f}x {item['max_abs_diff']:>9.2e}"
        )
    print(json.dumps({
        "bench": "merge_speed", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "results": results,
    }))


if __name__ == "__main__":
    main()
