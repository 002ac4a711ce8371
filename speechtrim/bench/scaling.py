"""Scaling study (FastAdaSP Tables 4, 5, 12, 13): long audio, with and without a 50 % prefill-FLOPs reduction.

For each audio length (real clips concatenated and tiled to 30-240 s) the unreduced model and the reducer run the
same prompt. Reported per length: theoretical prefill speed-up (FLOPs ratio, eq. 10 over the measured per-layer
lengths) vs measured prefill speed-up, decode throughput, KV-cache bytes, and the largest batch that fits a memory
budget. That last figure is an estimate bounded by the KV cache: ``(budget - weight bytes) // (KV bytes after
prefill + KV bytes of the generated tokens)`` per clip, ignoring activations and allocator overhead; it is labelled
so in every table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from speechtrim.bench.runner import median_encode, run_item, weight_bytes
from speechtrim.eval.harness import EvalItem
from speechtrim.hf.layers import text_backbone
from speechtrim.prompts import ASR_PROMPT

logger = logging.getLogger(__name__)

LENGTHS = (30, 60, 120, 240)
SAMPLE_RATE = 16000


def long_audio(clips: Sequence[np.ndarray], seconds: float, gap_seconds: float = 0.3) -> np.ndarray:
    """Clips joined (with short silences) and tiled until ``seconds`` long, then cut there: (seconds * 16000,).

    Args:
        clips: (T_i,) float32 mono clips at 16 kHz.
        seconds: wanted length.
        gap_seconds: silence between clips.
    """
    if not clips or seconds <= 0:
        raise ValueError(f"the scaling study needs at least one clip and lengths > 0 s (--scaling-lengths), got "
                         f"{len(clips)} clips and {seconds} s")
    gap = np.zeros(int(gap_seconds * SAMPLE_RATE), dtype=np.float32)
    one_pass = np.concatenate([piece for clip in clips for piece in (clip.astype(np.float32), gap)])  # (T_pass,)
    wanted = int(round(seconds * SAMPLE_RATE))
    repeats = -(-wanted // len(one_pass))
    return np.tile(one_pass, repeats)[:wanted]


def max_batch(budget_bytes: float, weights: int, per_clip_bytes: float) -> int:
    """Largest batch whose KV caches fit next to the weights in ``budget_bytes`` (0 when none fits)."""
    if per_clip_bytes <= 0:
        raise ValueError(f"per-clip bytes must be positive, got {per_clip_bytes}")
    return max(int((budget_bytes - weights) // per_clip_bytes), 0)


def scaling_study(model: Any, clips: Sequence[np.ndarray], method: Any, lengths: Sequence[float] = LENGTHS,
                  target: float = 0.5, max_new_tokens: int = 16, repeats: int = 1, memory_budget_gb: float = 80.0,
                  progress: bool = True) -> list[dict]:
    """Unreduced vs reduced runs on long audio; one row per (length, with/without reduction).

    Args:
        model: an :class:`~speechtrim.bench.runner.EmbeddedModel` or ``HubModel``.
        clips: real clips to concatenate.
        method: a :class:`~speechtrim.bench.sweep.Method` (e.g. FastAdaSP sparse).
        lengths: audio lengths in seconds.
        target: the prefill-FLOPs reduction asked of the method.
        max_new_tokens: tokens generated per run (the decode part; always that many, end-of-sequence ignored).
        repeats: timed runs (median) after one warm-up.
        memory_budget_gb: memory budget of the batch-size estimate.
        progress: show a progress bar.
    """
    weights = weight_bytes(model.decoder)
    backbone = text_backbone(model.decoder)
    rows: list[dict] = []
    budget = memory_budget_gb * 2**30
    warmed = False
    for seconds in tqdm(lengths, desc="scaling", unit="length", disable=not progress):
        item = EvalItem(f"{seconds:g}s", long_audio(clips, seconds), "", ASR_PROMPT)
        prepared = median_encode(model, item, 1)
        if not warmed:
            run_item(model, prepared, None, None, 2)
            warmed = True
        # fixed-length decode (no stop at end-of-sequence) so every run times the same number of tokens; the
        # unreduced model, the method, and the method attached at ratio 0 (its hooks, taps and bookkeeping with
        # nothing removed) take turns, repeat by repeat, so that a drift of the machine hits all three alike
        configs = {"full": None, "reduced": method.build(target), "idle": method.build_zero()}
        runs: dict[str, list] = {key: [] for key in configs}
        for _ in range(max(repeats, 1)):
            for key, reducer in configs.items():
                runs[key].append(run_item(model, prepared, reducer, None, max_new_tokens, 1, stop_at_eos=False))
        full, reduced, idle = (_median_run(runs[key]) for key in configs)
        # bytes one generated token adds to the cache: every layer stores one key and one value column
        per_token = full.kv_cache_bytes / max(prepared.length, 1)
        for name, run in (("none", full), (method.name, reduced)):
            per_clip = run.kv_cache_bytes + per_token * max_new_tokens
            decode_tps = run.decode_steps / run.decode_s if run.decode_steps and run.decode_s > 0 else None
            rows.append({
                "seconds": float(seconds), "method": name, "target": 0.0 if name == "none" else target,
                "audio_tokens": prepared.audio_tokens, "prompt_tokens": prepared.length,
                "flops_reduction": run.flops_reduction,
                "theoretical_prefill_speedup": 1.0 / (1.0 - run.flops_reduction),
                "measured_prefill_speedup": full.prefill_s / run.prefill_s if run.prefill_s > 0 else None,
                "ideal_fraction": (full.prefill_s / run.prefill_s) * (1.0 - run.flops_reduction)
                if run.prefill_s > 0 else None,
                "overhead_at_ratio_zero": None if name == "none" else idle.prefill_s / full.prefill_s - 1.0,
                "encode_ms": 1000 * prepared.encode_s, "prefill_ms": 1000 * run.prefill_s,
                "decode_ms": 1000 * run.decode_s, "tokens_per_s": decode_tps,
                "rtf": (prepared.encode_s + run.prefill_s + run.decode_s) / float(seconds),
                "kv_cache_bytes": run.kv_cache_bytes, "peak_mem_mb": run.peak_mem_mb,
                "memory_budget_gb": memory_budget_gb, "max_batch_kv_bound": max_batch(budget, weights, per_clip),
                "depth": backbone.depth,
            })
    return rows


def _median_run(runs: list) -> Any:
    """The first run, with the median prefill and decode seconds of all of them."""
    first = runs[0]
    first.prefill_s = float(np.median([run.prefill_s for run in runs]))
    first.decode_s = float(np.median([run.decode_s for run in runs]))
    return first


def scaling_table(rows: Sequence[dict]) -> str:
    """Markdown table of the scaling rows."""
    headers = ["audio s", "method", "audio tokens", "FLOPs red. %", "prefill × theory", "prefill × measured",
               "measured / theory", "overhead at ratio 0", "prefill ms", "decode ms", "tokens/s", "RTF", "KV MB",
               "max batch (KV-bound est.)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        tps = row["tokens_per_s"]
        speed = row["measured_prefill_speedup"]
        lines.append("| " + " | ".join([
            f"{row['seconds']:g}", row["method"], str(row["audio_tokens"]), f"{100 * row['flops_reduction']:.1f}",
            f"{row['theoretical_prefill_speedup']:.2f}", f"{speed:.2f}" if speed else "n/a",
            f"{row['ideal_fraction']:.2f}" if row.get("ideal_fraction") else "n/a",
            "—" if row.get("overhead_at_ratio_zero") is None else f"{100 * row['overhead_at_ratio_zero']:+.1f} %",
            f"{row['prefill_ms']:.0f}", f"{row['decode_ms']:.0f}", f"{tps:.1f}" if tps else "n/a",
            f"{row['rtf']:.3f}", f"{row['kv_cache_bytes'] / 2**20:.1f}", str(row["max_batch_kv_bound"]),
        ]) + " |")
    budget = rows[0]["memory_budget_gb"] if rows else 0
    return ("\n".join(lines) + f"\n\nmax batch: KV-cache-bound estimate for a {budget:g} GB budget, "
            "(budget - weights) / (KV bytes after prefill + KV bytes of the generated tokens); activations ignored.")
