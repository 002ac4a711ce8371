"""Scaling study (FastAdaSP Tables 4, 5, 12, 13): long audio, with and without a 50 % prefill-FLOPs reduction.

For each audio length (real clips concatenated and tiled to 30-240 s) the unreduced model and the reducer run the
same prompt. Reported per length: theoretical prefill speed-up (FLOPs ratio, eq. 10 over the measured per-layer
lengths) vs measured prefill speed-up, and the compute ideal (``speechtrim.flops.compute_flops_reduction``: every linear
weight and the causal attention counted, which eq. 10 undercounts for a gated MLP with grouped-query attention), decode throughput against the unreduced model's, KV-cache bytes, and two
figures for the largest batch under a memory budget: an estimate bounded by the KV cache, ``(budget - weight bytes)
// (KV bytes after prefill + KV bytes of the generated tokens)`` per clip (activations ignored), and, with a
``MemoryPlan``, the batch found by running it (``speechtrim.bench.memory``: a child process per measurement, peak
resident memory on CPU, peak allocated memory on CUDA) next to the measured peak of one clip.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from speechtrim.bench.runner import median_encode, run_item, weight_bytes
from speechtrim.eval.harness import EvalItem
from speechtrim.flops import compute_flops_reduction, linear_weights
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


@dataclass(frozen=True)
class MemoryPlan:
    """How the scaling study measures memory; every figure comes from a child process that loads the model anew.

    Args:
        model: the bench model as ``load_bench_model`` takes it ("embedded", a folder, a hub id).
        speechlm: a saved SpeechLM folder (None: ``model``).
        device: torch device of the children.
        budget_gb: the budget of the measured largest batch.
        search_lengths: audio lengths (seconds) whose largest batch is searched; None: the longest one only (a
            search runs batches up to the answer + 1, minutes at 240 s on CPU).
        new_tokens: tokens generated per row in a measurement.
        limit: the largest batch tried.
        threads: torch CPU threads of the children (None: torch's default).
        factory: "package.module:function" building the bench model in the children instead (see ``MemoryJob``).
    """

    model: str = "embedded"
    speechlm: str | None = None
    device: str = "cpu"
    budget_gb: float = 4.0
    search_lengths: tuple[float, ...] | None = None
    new_tokens: int = 4
    limit: int = 256
    threads: int | None = None
    factory: str | None = None

    def __post_init__(self) -> None:
        if not self.budget_gb > 0 or self.new_tokens < 1 or self.limit < 1:
            raise ValueError(f"--batch-budget-gb must be > 0 (got {self.budget_gb}), new tokens and the batch limit "
                             f">= 1 (got {self.new_tokens}, {self.limit})")


def _measure_memory(plan: MemoryPlan, prepared: Any, method: Any, target: float, reduced: bool, search: bool,
                    folder: Path) -> dict[str, Any]:
    """Peak memory of one clip and (``search``) the largest batch under the budget, for the unreduced model or the
    method; children read the prompt from ``folder``."""
    from speechtrim.bench.memory import MemoryJob, largest_batch, measure_in_child, save_inputs

    reducer_name, reducer_kwargs = None, None
    kwargs, spans = prepared.kwargs, prepared.audio_spans
    if reduced and method.layer is None and prepared.reduce_audio is not None:  # pre-LLM: the child gets the result
        shorter, _ = prepared.reduce_audio(method.build(target))
        kwargs, spans = shorter.kwargs, shorter.audio_spans
    elif reduced:
        reducer_name, reducer_kwargs = method.reducer, method.build_kwargs(target)
    inputs = save_inputs(kwargs, spans, folder)
    results: dict[int, dict] = {}

    def peak_of(batch: int) -> int:
        job = MemoryJob(str(inputs), plan.model, plan.speechlm, plan.device, reducer_name, reducer_kwargs, batch,
                        plan.new_tokens, plan.threads, plan.factory)
        results[batch] = measure_in_child(job)
        return results[batch]["peak_bytes"]

    budget = int(plan.budget_gb * 2**30)
    if search:
        best, _ = largest_batch(peak_of, budget, plan.limit)
    else:
        best = None
        peak_of(1)
    return {"peak_mem_mb": results[1]["peak_bytes"] / 2**20,
            "peak_mem_source": "cuda allocated" if plan.device.startswith("cuda") else "process RSS (child)",
            "max_batch_measured": best, "batch_budget_gb": plan.budget_gb,
            "batch_peaks_mb": {str(b): round(r["peak_bytes"] / 2**20, 1) for b, r in sorted(results.items())}}


def scaling_study(model: Any, clips: Sequence[np.ndarray], method: Any, lengths: Sequence[float] = LENGTHS,
                  target: float = 0.5, max_new_tokens: int = 16, repeats: int = 1, memory_budget_gb: float = 80.0,
                  progress: bool = True, memory: MemoryPlan | None = None, store: Path | None = None) -> list[dict]:
    """Unreduced vs reduced runs on long audio; one row per (length, with/without reduction).

    With ``store`` (a JSONL file) the two rows of each length are appended there as soon as that length is done,
    keyed by everything that made them (``scaling_key``), and a length whose rows are already there is not run
    again: an interrupted study resumes where it stopped.

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
        memory: measure peak memory and the largest batch (None: the rows carry the KV-bound estimate only).
        store: the resumable rows file (None: nothing is kept until the caller writes the result).
    """
    from speechtrim.bench.sweep import append_jsonl, read_jsonl, repair_jsonl

    done: dict[str, dict] = {}
    if store is not None:
        repair_jsonl(store)
        done = read_jsonl(store)
    settings = {"method": method, "target": target, "max_new_tokens": max_new_tokens, "repeats": repeats,
                "memory_budget_gb": memory_budget_gb, "memory": memory, "lengths": sorted(lengths)}
    weights = weight_bytes(model.decoder)
    backbone = text_backbone(model.decoder)
    layer_weights = [linear_weights(layer) for layer in backbone.layers]
    attention_width = backbone.num_heads * backbone.head_dim
    rows: list[dict] = []
    budget = memory_budget_gb * 2**30
    warmed = False
    for seconds in tqdm(lengths, desc="scaling", unit="length", disable=not progress):
        audio = long_audio(clips, seconds)
        length_key = scaling_key(model, audio, seconds, settings)
        if all(f"{length_key}/{name}" in done for name in ("none", method.name)):
            rows += [done[f"{length_key}/{name}"] for name in ("none", method.name)]
            logger.info("scaling: %g s reused from %s", seconds, store)
            continue
        item = EvalItem(f"{seconds:g}s", audio, "", ASR_PROMPT)
        prepared = median_encode(model, item, 1)
        if not warmed:
            run_item(model, prepared, None, None, 2)
            warmed = True
        # fixed-length decode (no stop at end-of-sequence) so every run times the same number of tokens; the
        # unreduced model, the method, and the method attached at ratio 0 (its hooks, taps and bookkeeping with
        # nothing removed) take turns, repeat by repeat, so that a drift of the machine hits all three alike; the
        # order rotates from one repeat to the next, so that no configuration always runs after the same one (the
        # allocator's state after a run depends on what that run allocated)
        configs = {"full": None, "reduced": method.build(target), "idle": method.build_zero()}
        runs: dict[str, list] = {key: [] for key in configs}
        clocks: dict[str, list] = {key: [] for key in configs}
        order = list(configs.items())
        for repeat in range(max(repeats, 1)):
            for key, reducer in order[repeat % 3 :] + order[: repeat % 3]:
                with LayerClock(backbone.layers) as clock:
                    runs[key].append(run_item(model, prepared, reducer, None, max_new_tokens, 1, stop_at_eos=False))
                clocks[key].append(clock.prefill)
        paired = _paired_ratios(runs)  # the ratio-0 runs count only through their paired overhead
        full, reduced = _median_run(runs["full"]), _median_run(runs["reduced"])
        layer_cost = costliest_layer(_median_layers(clocks["full"]), _median_layers(clocks["reduced"]))
        # bytes one generated token adds to the cache: every layer stores one key and one value column
        per_token = full.kv_cache_bytes / max(prepared.length, 1)
        measured: dict[str, dict] = {}
        if memory is not None:
            search = seconds in (memory.search_lengths or (max(lengths),))
            with tempfile.TemporaryDirectory(prefix="speechtrim-memory-") as folder:
                for name, is_reduced in (("none", False), (method.name, True)):
                    measured[name] = _measure_memory(memory, prepared, method, target, is_reduced, search,
                                                     Path(folder))
        for name, run in (("none", full), (method.name, reduced)):
            per_clip = run.kv_cache_bytes + per_token * max_new_tokens
            decode_tps = run.decode_steps / run.decode_s if run.decode_steps and run.decode_s > 0 else None
            compute_saved = compute_flops_reduction(full.tokens_per_layer, run.tokens_per_layer, layer_weights,
                                                    attention_width)
            own = paired["none" if name == "none" else "reduced"]
            speedup = own["speedup"]
            rows.append({
                "seconds": float(seconds), "method": name, "target": 0.0 if name == "none" else target,
                "audio_tokens": prepared.audio_tokens, "prompt_tokens": prepared.length,
                "flops_reduction": run.flops_reduction,
                "theoretical_prefill_speedup": 1.0 / (1.0 - run.flops_reduction),
                "measured_prefill_speedup": speedup,
                "ideal_fraction": speedup * (1.0 - run.flops_reduction) if speedup else None,
                "compute_flops_reduction": compute_saved, "compute_prefill_speedup": 1.0 / (1.0 - compute_saved),
                "compute_fraction": speedup * (1.0 - compute_saved) if speedup else None,
                "measured_prefill_speedup_ci": own["speedup_ci"],
                "overhead_at_ratio_zero": None if name == "none" else paired["idle"]["overhead"],
                "overhead_at_ratio_zero_ci": None if name == "none" else paired["idle"]["overhead_ci"],
                "costliest_layer_vs_unreduced": None if name == "none" else layer_cost,
                "encode_ms": 1000 * prepared.encode_s, "prefill_ms": 1000 * run.prefill_s,
                "decode_ms": 1000 * run.decode_s, "tokens_per_s": decode_tps,
                "rtf": (prepared.encode_s + run.prefill_s + run.decode_s) / float(seconds),
                "decode_vs_unreduced": own["decode"], "decode_vs_unreduced_ci": own["decode_ci"],
                "kv_cache_bytes": run.kv_cache_bytes, "peak_mem_mb": run.peak_mem_mb,
                "memory_budget_gb": memory_budget_gb, "max_batch_kv_bound": max_batch(budget, weights, per_clip),
                "max_batch_measured": None, "depth": backbone.depth, **measured.get(name, {}),
            })
        if store is not None:
            for row in rows[-2:]:
                append_jsonl(store, {**row, "key": f"{length_key}/{row['method']}"})
    return [{name: value for name, value in row.items() if name != "key"} for row in rows]


def scaling_key(model: Any, audio: np.ndarray, seconds: float, settings: dict[str, Any]) -> str:
    """A hash of everything that makes one length's rows: the model's weights, the audio, the method and the study's
    settings, the torch threads and device, and the software versions."""
    import dataclasses
    from importlib.metadata import version

    import torch

    from speechtrim.fingerprint import array_fingerprint, json_fingerprint

    plain = {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
             for name, value in settings.items()}
    return json_fingerprint({"model": model.fingerprint, "audio": array_fingerprint(audio), "seconds": seconds,
                             **plain, "threads": torch.get_num_threads(),
                             "device": str(next(model.decoder.parameters()).device),
                             "speechtrim": version("speechtrim"), "transformers": version("transformers"),
                             "torch": torch.__version__})


class LayerClock:
    """Seconds each decoder layer took in the prefill of the runs inside the ``with`` block (hooks on the layers,
    registered first, so a reducer's own pre-hook work at a layer counts to that layer).

    ``prefill``: per layer, (input length, seconds) of the last forward with more than one token."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.layers = list(layers)
        self.prefill: list[tuple[int, float]] = [(0, 0.0)] * len(self.layers)
        self._started: dict[int, tuple[int, float]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerClock:
        import time

        def before(index: int) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self._started[index] = (int(hidden.shape[1]), time.perf_counter())
            return hook

        def after(index: int) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
                length, started = self._started.pop(index, (0, 0.0))
                if length > 1:
                    self.prefill[index] = (length, time.perf_counter() - started)
            return hook

        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(before(index), with_kwargs=True, prepend=True))
            self._handles.append(layer.register_forward_hook(after(index), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _median_layers(clocks: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Per layer: the input length and the median seconds over repeats."""
    return [(layer_runs[0][0], float(np.median([seconds for _, seconds in layer_runs])))
            for layer_runs in zip(*clocks)]


def costliest_layer(full: list[tuple[int, float]], reduced: list[tuple[int, float]]) -> float | None:
    """The largest ratio of a layer's time with the method to the same layer's time unreduced, among the layers that
    ran on the unreduced length in both (where the method only observes, e.g. computes attention scores); None when
    there is no such layer (a reduction from layer 0)."""
    ratios = [with_method / without for (length, without), (reduced_length, with_method) in zip(full, reduced)
              if length == reduced_length and length > 1 and without > 0]
    return max(ratios) if ratios else None


def _scaled(interval: Sequence[float] | None, factor: float) -> tuple[float, float] | None:
    return None if interval is None else (interval[0] * factor, interval[1] * factor)


def _interval_cell(value: float, interval: Sequence[float] | None, pattern: str) -> str:
    """``1.85 [1.80–1.88]``: a value and, when there is one, its interval."""
    cell = pattern.format(value)
    return cell if interval is None else f"{cell} [{pattern.format(interval[0])}–{pattern.format(interval[1])}]"


def _paired_ratios(runs: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Per configuration ("none", "reduced", "idle"), medians over repeats of its ratios to the unreduced run of the
    same repeat (which ran next to it), with 95 % bootstrap intervals: prefill speed-up, overhead (prefill time
    ratio - 1) and decode throughput ratio. Pairing within a repeat cancels a drift of the machine between repeats,
    which a ratio of the two medians keeps."""
    from speechtrim.eval.metrics import median_interval

    full = runs["full"]
    out: dict[str, dict[str, Any]] = {}
    for key, label in (("full", "none"), ("reduced", "reduced"), ("idle", "idle")):
        speedups = [base.prefill_s / run.prefill_s for base, run in zip(full, runs[key]) if run.prefill_s > 0]
        overheads = [run.prefill_s / base.prefill_s - 1.0 for base, run in zip(full, runs[key]) if base.prefill_s > 0]
        decodes = [(run.decode_steps / run.decode_s) / (base.decode_steps / base.decode_s)
                   for base, run in zip(full, runs[key])
                   if run.decode_steps and base.decode_steps and run.decode_s > 0 and base.decode_s > 0]
        out[label] = {"speedup": float(np.median(speedups)) if speedups else None,
                      "speedup_ci": median_interval(speedups) if key != "full" else None,
                      "overhead": float(np.median(overheads)) if overheads else None,
                      "overhead_ci": median_interval(overheads) if key != "full" else None,
                      "decode": float(np.median(decodes)) if decodes else None,
                      "decode_ci": median_interval(decodes) if key != "full" else None}
    return out


def _median_run(runs: list) -> Any:
    """The first run, with the median prefill and decode seconds of all of them."""
    first = runs[0]
    first.prefill_s = float(np.median([run.prefill_s for run in runs]))
    first.decode_s = float(np.median([run.decode_s for run in runs]))
    return first


def scaling_table(rows: Sequence[dict]) -> str:
    """Markdown table of the scaling rows."""
    measured = next((row for row in rows if row.get("batch_budget_gb")), None)
    batch_header = f"max batch @ {measured['batch_budget_gb']:g} GB (measured)" if measured else "max batch (measured)"
    headers = ["audio s", "method", "audio tokens", "FLOPs red. %", "prefill × theory", "prefill × measured",
               "measured / theory", "compute ideal ×", "measured / compute", "overhead at ratio 0", "costliest layer ×",
               "prefill ms", "decode ms", "tokens/s", "decode × none",
               "RTF", "KV MB", "peak MB (1 clip)", batch_header, "max batch (KV-bound est.)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        tps = row["tokens_per_s"]
        speed = row["measured_prefill_speedup"]
        lines.append("| " + " | ".join([
            f"{row['seconds']:g}", row["method"], str(row["audio_tokens"]), f"{100 * row['flops_reduction']:.1f}",
            f"{row['theoretical_prefill_speedup']:.2f}",
            _interval_cell(speed, row.get("measured_prefill_speedup_ci"), "{:.2f}") if speed else "n/a",
            f"{row['ideal_fraction']:.2f}" if row.get("ideal_fraction") else "n/a",
            f"{row['compute_prefill_speedup']:.2f}" if row.get("compute_prefill_speedup") else "n/a",
            f"{row['compute_fraction']:.2f}" if row.get("compute_fraction") else "n/a",
            "—" if row.get("overhead_at_ratio_zero") is None else _interval_cell(
                100 * row["overhead_at_ratio_zero"], _scaled(row.get("overhead_at_ratio_zero_ci"), 100), "{:+.1f}")
            + " %",
            "—" if row.get("costliest_layer_vs_unreduced") is None else f"{row['costliest_layer_vs_unreduced']:.2f}",
            f"{row['prefill_ms']:.0f}", f"{row['decode_ms']:.0f}", f"{tps:.1f}" if tps else "n/a",
            _interval_cell(row["decode_vs_unreduced"], row.get("decode_vs_unreduced_ci"), "{:.2f}")
            if row.get("decode_vs_unreduced") else "n/a",
            f"{row['rtf']:.3f}", f"{row['kv_cache_bytes'] / 2**20:.1f}",
            f"{row['peak_mem_mb']:.0f}" if row.get("peak_mem_mb") else "n/a",
            "—" if row.get("max_batch_measured") is None else str(row["max_batch_measured"]),
            str(row["max_batch_kv_bound"]),
        ]) + " |")
    budget = rows[0]["memory_budget_gb"] if rows else 0
    notes = ["prefill × measured, overhead at ratio 0, decode × none: medians over repeats of the ratio to the "
             "unreduced run of the same repeat, [95 % bootstrap interval of that median] from 3 repeats on.",
             "prefill × theory: FastAdaSP eq. 10 over the lengths each layer saw (what the targets are solved on); "
             "compute ideal ×: the same lengths with every linear weight (three MLP matrices, grouped-query key and "
             "value projections) and the causal half of attention counted, the speed-up a prefill reaches when its "
             "layers run at one FLOP rate; eq. 10 puts more of the saving in the quadratic attention term, so at "
             "long prompts it promises more than the compute ideal.",
             "costliest layer ×: among the layers that still run on the full prompt with the method attached, the "
             "largest ratio of a layer's prefill time to the same layer's unreduced time (the layer that computes "
             "attention scores for the next one's decision); '—': the method reduces from layer 0.",
             f"max batch (KV-bound est.): for a {budget:g} GB budget, (budget - weights) / (KV bytes after prefill + "
             "KV bytes of the generated tokens); activations ignored."]
    if measured:
        notes.append(f"peak MB and max batch (measured): {measured['peak_mem_source']}, one child process per "
                     f"measurement; the largest batch whose peak stayed within {measured['batch_budget_gb']:g} GB, "
                     "found by running batches (that one fitted, one more did not); '—': not searched at that length.")
    else:
        notes.append("peak MB: torch's peak allocated memory on CUDA, n/a on CPU without --batch-budget-gb.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)
