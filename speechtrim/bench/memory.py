"""Measured memory: the peak resident memory of a batch run in its own child process, and the largest batch under a
budget found by running it (issue 15's goal 3).

One measurement = one fresh process: it loads the bench model, reads the prepared prompt the parent saved (so it
encodes nothing), copies it ``batch`` times, trims the heap, resets the kernel's high-water mark of the process's
resident memory (``/proc/self/clear_refs``), runs prefill and a fixed number of greedy decode steps with the
reducer attached, and reports the high-water mark (``VmHWM``): weights, activations, KV cache and allocator
overhead, everything a process serving that batch needs. The child maps every large buffer on its own
(``child_environment``), so freed memory leaves the resident set and the peak is that of the tensors alive at
once. Without ``clear_refs`` (not Linux) it reports the process's lifetime peak (``ru_maxrss``), loading included,
and says so.

``largest_batch`` finds the largest batch whose measured peak fits a budget: two small batches give a line, the
line's guess is run, and bisection between measured fits and misses settles it, so the answer ``b`` has been run
and fitted, and ``b + 1`` has been run and did not (unless ``b`` is the search's limit).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

RESULT_PREFIX = "SPEECHTRIM_MEMORY "


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes, None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's resident high-water mark to its current resident size (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's resident high-water mark: VmHWM, or ru_maxrss where /proc is missing."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc), so one measurement's leftovers do not count in the next."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def batched(kwargs: dict[str, Any], spans: list | None, batch: int) -> tuple[dict[str, Any], list | None]:
    """A batch-of-one prefill's kwargs and audio spans repeated ``batch`` times (real copies, as a batch holds)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    out = {}
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            out[name] = value
            continue
        axis = 1 if name == "position_ids" and value.ndim == 3 else 0  # M-RoPE ids are (3, B, T)
        if value.shape[axis] != 1:
            raise ValueError(f"batched() takes a batch-of-one prompt; {name} has shape {tuple(value.shape)}")
        out[name] = value.repeat_interleave(batch, dim=axis)
    return out, (spans * batch if spans is not None else None)


@torch.no_grad()
def run_batch(decoder: torch.nn.Module, kwargs: dict[str, Any], spans: list | None, reducer: Any, batch: int,
              new_tokens: int) -> dict[str, Any]:
    """Prefill and ``new_tokens - 1`` greedy decode steps of ``batch`` copies of one prompt; the peak memory of it.

    Args:
        decoder: the causal LM.
        kwargs: a batch-of-one prefill's keyword arguments (``inputs_embeds`` or ``input_ids``, masks, positions).
        spans: its audio spans ([[(start, end)]]), or None when the model's audio token id finds them.
        reducer: a built in-decoder reducer, or None (pre-LLM reductions are applied to ``kwargs`` beforehand).
        batch: copies of the prompt.
        new_tokens: tokens generated per row (the first from the prefill), end-of-sequence ignored.
    """
    import contextlib

    from speechtrim.hf.kv_evict import kv_cache_bytes
    from speechtrim.hf.layers import CACHE_KWARG, returned_cache

    inputs, audio_spans = batched(kwargs, spans, batch)
    cuda = inputs["attention_mask"].device.type == "cuda"
    trim_heap()
    baseline = _status_bytes("VmRSS")
    exact = reset_peak_rss()
    if cuda:  # on a GPU what counts is the device's memory: torch's allocator peak, weights included
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, exact = torch.cuda.memory_allocated(), True
    context = reducer(decoder, audio_spans=audio_spans) if reducer is not None else contextlib.nullcontext()
    started = time.perf_counter()
    with context:
        out = decoder(**inputs, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - started
        cache = returned_cache(out)
        cache_bytes = kv_cache_bytes(cache)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        del out
        mask, position = inputs["attention_mask"], inputs["position_ids"][..., -1:]
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            step = decoder(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                           **{CACHE_KWARG: cache})
            token = step.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        decode_s = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"batch": batch, "peak_bytes": peak, "baseline_bytes": baseline,
            "peak_is_run_only": exact, "kv_cache_bytes": cache_bytes, "prefill_s": prefill_s, "decode_s": decode_s,
            "new_tokens": new_tokens}


@dataclass(frozen=True)
class MemoryJob:
    """What one child process measures.

    Args:
        inputs: a file holding the prepared prompt (``torch.save`` of {"kwargs", "spans"}), reduced already for a
            pre-LLM method.
        model: the bench model (``load_bench_model``'s ``model``).
        speechlm: a saved SpeechLM folder for the embedded model (None: the packaged one).
        device: torch device.
        reducer: registry name of an in-decoder reducer, or None.
        reducer_kwargs: its ``reducers.build`` keyword arguments.
        batch: copies of the prompt.
        new_tokens: tokens generated per row.
        threads: torch CPU threads.
        factory: "package.module:function" returning the bench model, called with no arguments, instead of
            ``load_bench_model(model, speechlm, device)`` (a model built in code, e.g. a test's tiny one).
    """

    inputs: str
    model: str = "embedded"
    speechlm: str | None = None
    device: str = "cpu"
    reducer: str | None = None
    reducer_kwargs: dict | None = None
    batch: int = 1
    new_tokens: int = 4
    threads: int | None = None
    factory: str | None = None


def child_environment() -> dict[str, str]:
    """The measuring child's environment: no progress bars, and glibc's mmap threshold fixed at 64 kB (unless the
    caller set one), so every tensor buffer is its own mapping, given back to the system when freed. With glibc's
    default (a threshold that grows with the buffers freed) freed buffers stay resident or not by the allocator's
    history: at 240 s of audio the unreduced model's peak grew by 246 MB per clip from batch 1 to 2 and by 435 MB
    per clip from 2 to 4, against ~210 MB of tensors per clip; with the fixed threshold the peak follows the
    tensors alive at once."""
    return {**os.environ, "TQDM_DISABLE": "1", "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_",
                                                                                         "65536")}


def measure_in_child(job: MemoryJob, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run ``job`` in a fresh Python process and return its measurement (``run_batch``'s dict)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(asdict(job), handle)
    try:
        done = subprocess.run([sys.executable, "-m", "speechtrim.bench.memory", handle.name], capture_output=True,
                              text=True, timeout=timeout_s, env=child_environment())
    finally:
        os.unlink(handle.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        killed = done.returncode in (-9, 137)
        raise RuntimeError(f"the memory measurement of batch {job.batch} failed (exit {done.returncode}"
                           f"{', killed: out of memory?' if killed else ''}): {done.stderr.strip()[-1500:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def largest_batch(peak_of: Callable[[int], int], budget_bytes: int, limit: int = 256) -> tuple[int, dict[int, int]]:
    """The largest batch whose measured peak memory is at most ``budget_bytes``, and every peak measured.

    Each probe is read off the line through the two nearest measured batches that bracket the budget (or, before a
    batch has missed it, the two largest that fit), so a near-linear peak is settled in a handful of runs: two
    small batches, the line's guess, its neighbour. Before any miss a probe is at most 4x the largest batch that
    fitted (a batch of one carries fixed transients that make the first line too flat, and a run's time grows with
    its batch); a probe that narrows the bracket by less than half is followed by a bisection step, so a peak far
    from linear still costs no more than a bisection.

    Args:
        peak_of: runs a batch and returns its peak bytes (e.g. a child process per call).
        budget_bytes: the budget.
        limit: the largest batch tried.
    """
    if budget_bytes <= 0 or limit < 1:
        raise ValueError(f"need a positive budget and limit, got {budget_bytes} bytes and {limit}")
    peaks: dict[int, int] = {}

    def fits(batch: int) -> bool:
        if batch not in peaks:
            peaks[batch] = int(peak_of(batch))
            logger.info("batch %d: peak %.0f MB (budget %.0f MB)", batch, peaks[batch] / 2**20, budget_bytes / 2**20)
        return peaks[batch] <= budget_bytes

    def on_the_line(low: int, high: int | None) -> int:
        """Where the line through two measured batches crosses the budget, strictly inside (low, high)."""
        below = max((b for b in peaks if b < low), default=None) if high is None else None
        first, second = (below, low) if high is None else (low, high)
        if first is None:
            return low + 1
        per_batch = max((peaks[second] - peaks[first]) / (second - first), 1.0)
        guess = low + int((budget_bytes - peaks[low]) // per_batch)
        return max(low + 1, min(guess, min(limit, 4 * low) if high is None else high - 1))

    if not fits(1):
        return 0, peaks
    low, high = 1, None  # low fits; high (when known) does not
    bisect = False
    while low < limit and (high is None or high - low > 1):
        width = (high if high is not None else limit + 1) - low
        probe = (low + high) // 2 if bisect and high is not None else on_the_line(low, high)
        if fits(probe):
            low = probe
        else:
            high = probe
        bisect = not bisect and ((high if high is not None else limit + 1) - low) * 2 > width
    return low, peaks


def save_inputs(kwargs: dict[str, Any], spans: list | None, folder: Path) -> Path:
    """Write a prepared prompt for ``MemoryJob.inputs`` (tensors detached, on CPU)."""
    path = Path(folder) / "prompt.pt"
    torch.save({"kwargs": {name: value.detach().cpu() if isinstance(value, torch.Tensor) else value
                           for name, value in kwargs.items()}, "spans": spans}, path)
    return path


def _child(job_file: str) -> None:
    """The child process: load the model, measure one batch, print the result line."""
    from speechtrim import reducers
    from speechtrim.bench.runner import load_bench_model

    job = MemoryJob(**json.loads(Path(job_file).read_text()))
    if job.threads:
        torch.set_num_threads(job.threads)
    if job.factory:
        import importlib

        module, _, function = job.factory.partition(":")
        model = getattr(importlib.import_module(module), function)()
    else:
        model = load_bench_model(job.model, job.speechlm, job.device)
    saved = torch.load(job.inputs, weights_only=False)
    kwargs = {name: value.to(job.device) if isinstance(value, torch.Tensor) else value
              for name, value in saved["kwargs"].items()}
    reducer = reducers.build(job.reducer, **(job.reducer_kwargs or {})) if job.reducer else None
    result = run_batch(model.decoder, kwargs, saved["spans"], reducer, job.batch, job.new_tokens)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])


__all__ = ["MemoryJob", "batched", "child_environment", "largest_batch", "measure_in_child", "peak_rss_bytes",
           "reset_peak_rss", "run_batch", "save_inputs"]
