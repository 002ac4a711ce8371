"""Measured memory: the largest-batch search, batched prompts, a batch run's peak, and the child process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechtrim import reducers
from speechtrim.bench.memory import (MemoryJob, batched, child_environment, largest_batch, measure_in_child,
                                     peak_rss_bytes, run_batch, save_inputs)
from speechtrim.bench.runner import EmbeddedModel
from speechtrim.eval.harness import EvalItem
from speechtrim.prompts import ASR_PROMPT
from tests.tiny_speechlm import tiny_speechlm

FACTORY = "tests.test_memory:tiny_bench_model"


def tiny_bench_model() -> EmbeddedModel:
    """What the child processes build: the same tiny random SpeechLM every time (seeded)."""
    return EmbeddedModel(tiny_speechlm(seed=0, layers=4, max_positions=4096), "tiny", trained=False)


def _prepared(model: EmbeddedModel, seconds: float = 2.0):
    audio = np.random.default_rng(0).normal(0, 0.05, int(seconds * 16000)).astype(np.float32)
    return model.prepare(EvalItem("clip", audio, "", ASR_PROMPT))


def _linear(base: int, per_batch: int, calls: list[int]):
    def peak_of(batch: int) -> int:
        calls.append(batch)
        return base + per_batch * batch
    return peak_of


def test_largest_batch_runs_the_answer_and_one_more():
    calls: list[int] = []
    best, peaks = largest_batch(_linear(100, 30, calls), budget_bytes=400)
    assert best == 10 and peaks[10] <= 400 < peaks[11]
    assert len(calls) == len(set(calls)) <= 5  # two points, the line's guess, its neighbour: no blind sweep
    # a peak that grows faster than the line through batches 1 and 2 (activations): bisection still settles it
    best, peaks = largest_batch(lambda b: 100 + 10 * b * b, budget_bytes=1000)
    assert best == 9 and peaks[9] <= 1000 < peaks[10]
    # slower than the line: galloping up from the guess
    best, peaks = largest_batch(lambda b: 500 + 100 * b if b <= 2 else 700 + 10 * b, budget_bytes=1000)
    assert best == 30 and peaks[30] <= 1000 < peaks[31]


def test_largest_batch_is_not_misled_by_a_heavy_batch_of_one():
    """Batch 1 carries fixed transients (its peak is high, the line through 1 and 2 flat): no probe runs far past
    the answer, and the search still ends with the answer and one more (the 240 s study's shape: ~208 MB a clip)."""
    calls: list[int] = []

    def peak_of(batch: int) -> int:
        calls.append(batch)
        return 1400 if batch == 1 else 1010 + 208 * batch

    best, peaks = largest_batch(peak_of, budget_bytes=4096)
    assert best == 14 and peaks[14] <= 4096 < peaks[15]
    assert max(calls) <= 15 and len(calls) == len(set(calls)) <= 6
    calls.clear()  # a peak that grows faster than any line: bisection steps keep the count near log2
    best, peaks = largest_batch(lambda b: calls.append(b) or 2 ** min(b, 60), budget_bytes=2**40, limit=256)
    assert best == 40 and len(calls) <= 16


def test_largest_batch_edges():
    assert largest_batch(lambda b: 500, budget_bytes=400) == (0, {1: 500})  # not even one clip fits
    assert largest_batch(lambda b: 1, budget_bytes=400, limit=8)[0] == 8  # everything fits up to the limit
    with pytest.raises(ValueError, match="positive budget"):
        largest_batch(lambda b: 1, budget_bytes=0)


def test_batched_copies_a_batch_of_one():
    kwargs = {"inputs_embeds": torch.randn(1, 5, 3), "attention_mask": torch.ones(1, 5, dtype=torch.long),
              "position_ids": torch.arange(5)[None, None].expand(3, 1, 5)}  # M-RoPE ids: (3, B, T)
    out, spans = batched(kwargs, [[(1, 4)]], 3)
    assert out["inputs_embeds"].shape == (3, 5, 3) and torch.equal(out["inputs_embeds"][2], kwargs["inputs_embeds"][0])
    assert out["attention_mask"].shape == (3, 5) and out["position_ids"].shape == (3, 3, 5)
    assert spans == [[(1, 4)]] * 3
    with pytest.raises(ValueError, match="batch-of-one"):
        batched({"attention_mask": torch.ones(2, 5)}, None, 2)


def test_run_batch_peak_and_cache_follow_the_batch(one_thread):
    model = tiny_bench_model()
    prepared = _prepared(model)
    one = run_batch(model.decoder, prepared.kwargs, prepared.audio_spans, None, 1, 3)
    three = run_batch(model.decoder, prepared.kwargs, prepared.audio_spans, None, 3, 3)
    assert three["kv_cache_bytes"] == 3 * one["kv_cache_bytes"]
    assert one["peak_bytes"] >= one["baseline_bytes"] > 0 and one["peak_is_run_only"]
    assert peak_rss_bytes() >= one["baseline_bytes"]
    reducer = reducers.build("fastv", ratio=0.5, layer=1)
    reduced = run_batch(model.decoder, prepared.kwargs, prepared.audio_spans, reducer, 3, 3)
    assert reduced["kv_cache_bytes"] < three["kv_cache_bytes"]


def test_a_child_process_measures_one_batch(tmp_path):
    model = tiny_bench_model()
    prepared = _prepared(model)
    inputs = save_inputs(prepared.kwargs, prepared.audio_spans, tmp_path)
    one = measure_in_child(MemoryJob(str(inputs), batch=1, new_tokens=2, threads=1, factory=FACTORY))
    two = measure_in_child(MemoryJob(str(inputs), batch=2, new_tokens=2, threads=1, factory=FACTORY,
                                     reducer="fastv", reducer_kwargs={"ratio": 0.5, "layer": 1}))
    in_process = run_batch(model.decoder, prepared.kwargs, prepared.audio_spans, None, 1, 2)
    assert one["kv_cache_bytes"] == in_process["kv_cache_bytes"]  # the child ran the same prompt
    assert one["peak_bytes"] > 100 * 2**20  # a whole Python + torch process, not a tensor's bytes
    assert two["batch"] == 2 and two["kv_cache_bytes"] < 2 * one["kv_cache_bytes"]
    with pytest.raises(RuntimeError, match="memory measurement of batch 1 failed"):
        measure_in_child(MemoryJob(str(tmp_path / "missing.pt"), factory=FACTORY))


def test_the_child_maps_large_buffers_unless_told_otherwise(monkeypatch):
    """glibc's growing mmap threshold would keep freed buffers resident by allocation history; the child fixes it."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert child_environment()["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert child_environment()["TQDM_DISABLE"] == "1"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")  # a user's own setting wins
    assert child_environment()["MALLOC_MMAP_THRESHOLD_"] == "1048576"


@pytest.mark.slow
def test_scaling_study_measures_peak_memory_and_the_largest_batch(one_thread):
    from speechtrim.bench.scaling import MemoryPlan, scaling_study, scaling_table
    from speechtrim.bench.sweep import select_methods

    model = tiny_bench_model()
    clips = [np.random.default_rng(1).normal(0, 0.05, 8000).astype(np.float32)]
    method = select_methods(["fastv"], 1)[1]
    plan = MemoryPlan(budget_gb=64.0, limit=3, new_tokens=2, threads=1, factory=FACTORY)
    rows = scaling_study(model, clips, method, lengths=(1.0, 2.0), target=0.4, max_new_tokens=2, progress=False,
                         memory=plan)
    assert all(row["peak_mem_mb"] > 100 and row["peak_mem_source"] == "process RSS (child)" for row in rows)
    assert [row["max_batch_measured"] for row in rows] == [None, None, 3, 3]  # searched at the longest length only
    assert set(rows[2]["batch_peaks_mb"]) == {"1", "2", "3"}
    table = scaling_table(rows)
    assert "max batch @ 64 GB (measured)" in table and "peak MB (1 clip)" in table
