"""``speechtrim bench --engine vllm``: the same sweep served by vLLM, pre-LLM methods only, with throughput.

For every evaluation set, speechtrim prepares each clip once (encoder -> projector -> splice), applies each pre-LLM
method at each FLOPs target, and sends all the clips' prompt embeddings to the vLLM server at once (``concurrency``
requests in flight, which vLLM batches). A row holds the task metric, the fidelity to the unreduced vLLM outputs,
the measured FLOPs reduction, requests/s, generated tokens/s and the median time to first token; the unreduced row
also says how many greedy answers equal transformers' (``transformers_agreement``) and the throughput of the
transformers loop on the same clips, one at a time. Label tasks read the label off the generated answer (the first
candidate it starts with), where the transformers sweep scores the candidates.

In-decoder methods are refused: vLLM's paged KV cache keeps one length for all layers, so per-layer shrinking has
nowhere to go. Rows are appended to ``results.jsonl`` as they finish, so an interrupted run or a server that dies
mid-sweep keeps what was done; a new run sets an old file aside as ``results.previous.jsonl``.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speechtrim.bench.sweep import Method
from speechtrim.eval.harness import TASK_RECORDS, EvalSet, fidelity, score_interval, task_scores
from speechtrim.flops import TargetUnreachable

logger = logging.getLogger(__name__)

IN_DECODER_REFUSAL = ("{names} change the decoder's layers, which vLLM cannot run: its paged KV cache keeps one "
                      "length for every layer. With --engine vllm use the pre-LLM methods ({pre_llm}); run the "
                      "others with the default transformers engine")


def vllm_methods(methods: list[Method], named: bool) -> list[Method]:
    """The methods vLLM can run: the unreduced model and the pre-LLM methods. With methods ``named`` by the user,
    an in-decoder one is refused (ValueError); from "all" they are left out."""
    from speechtrim import reducers

    def pre_llm(method: Method) -> bool:
        return method.reducer is None or reducers.REDUCERS.get(method.reducer).acts_on == "embeddings"

    refused = [method.name for method in methods if not pre_llm(method)]
    if refused and named:
        names = sorted(n for n in reducers.names() if reducers.REDUCERS.get(n).acts_on == "embeddings")
        raise ValueError(IN_DECODER_REFUSAL.format(names=refused, pre_llm=", ".join(names)))
    return [method for method in methods if pre_llm(method)]


def label_of(text: str, labels: tuple[str, ...]) -> str:
    """The candidate label a generated answer starts with (case and spaces ignored), else the answer itself."""
    answer = text.strip().lower()
    for label in sorted(labels, key=len, reverse=True):
        if answer.startswith(label.lower()):
            return label
    return answer


def run_vllm_sweep(model: Any, sets: list[EvalSet], methods: list[Method], targets: tuple[float, ...],
                   connect: Callable[[], Any], jsonl: Path, max_new_tokens: int = 32, concurrency: int = 16,
                   progress: bool = True, task_targets: dict[str, tuple[float, ...]] | None = None
                   ) -> list[dict[str, Any]]:
    """Every method x target on every set through the vLLM server; rows appended to ``jsonl`` as they finish.

    The transformers pass over the unreduced clips (agreement and throughput) runs first, before ``connect``
    starts or reaches the server, so that an idle server's workers do not share the cores with it.

    Args:
        model: an :class:`~speechtrim.bench.runner.EmbeddedModel` (speechtrim splices the audio itself).
        sets: evaluation sets.
        methods: the unreduced model and pre-LLM methods (:func:`vllm_methods`).
        targets: target prefill-FLOPs reductions.
        connect: a context-manager factory yielding a :class:`~speechtrim.engines.vllm.VLLMClient`.
        jsonl: the results file.
        max_new_tokens: most tokens generated per clip.
        concurrency: requests in flight at once.
        progress: show a progress bar.
        task_targets: targets for the sets of a task in place of ``targets`` (``SweepConfig.task_targets``).
    """
    from tqdm.auto import tqdm

    from speechtrim.bench.runner import run_item

    task_targets = task_targets or {}

    def own(evalset: EvalSet) -> tuple[float, ...]:
        return tuple(task_targets.get(evalset.task, targets))

    local = []  # per set: the prepared clips, transformers' unreduced answers and their seconds
    for evalset in tqdm(sets, desc="transformers pass", unit="set", disable=not progress):
        prepared = [model.prepare(item) for item in evalset.items]
        started = time.perf_counter()
        runs = [run_item(model, clip, None, max_new_tokens=max_new_tokens) for clip in prepared]
        local.append((prepared, runs, time.perf_counter() - started))
    rows: list[dict[str, Any]] = []
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    total = sum(1 + len(own(evalset)) * (len(methods) - 1) for evalset in sets)
    with connect() as client:
        client.check()
        bar = tqdm(total=total, desc="vllm sweep", unit="row", disable=not progress)
        for evalset, (prepared, runs, local_s) in zip(sets, local):
            references = [item.reference for item in evalset.items]
            full = None
            for method in methods:
                for target in (own(evalset) if method.reducer is not None else (0.0,)):
                    try:
                        row = _sweep_row(evalset, method, target, prepared, client, max_new_tokens, concurrency)
                    except TargetUnreachable as error:  # e.g. 30 % of a prompt that is mostly text: a '—' cell
                        logger.info("%s at %.0f%% on %s: %s", method.name, 100 * target, evalset.name, error)
                        row = {"engine": "vllm", "data": evalset.name, "task": evalset.task, "clips": len(evalset),
                               "method": method.name, "target": target, "unreachable": str(error)}
                        rows.append(row)
                        with open(jsonl, "a", encoding="utf-8") as handle:
                            handle.write(json.dumps(row) + "\n")
                        bar.update(1)
                        continue
                    outputs = row.pop("outputs")
                    if method.reducer is None:
                        full = outputs
                        texts = row.pop("texts")
                        local_texts = [run.generated for run in runs]
                        row["transformers_agreement"] = sum(a == b for a, b in zip(local_texts, texts)) / len(texts)
                        row["transformers_requests_per_s"] = len(evalset) / local_s
                        row["transformers_tokens_per_s"] = sum(run.decode_steps + 1 for run in runs) / local_s
                        row["examples"] = [{"vllm": a, "transformers": b} for a, b in zip(texts[:3], local_texts)]
                        if row["transformers_agreement"] < 1.0:
                            logger.warning("%s: %.0f %% of vLLM's unreduced answers equal transformers' greedy "
                                           "ones", evalset.name, 100 * row["transformers_agreement"])
                    else:
                        row.pop("texts")
                    row["fidelity"] = fidelity(evalset.task, full, outputs)
                    row["metric_ci"] = score_interval(evalset.task, references, outputs)
                    rows.append(row)
                    with open(jsonl, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
                    bar.update(1)
        bar.close()
    return rows


def _sweep_row(evalset: EvalSet, method: Method, target: float, prepared: list, client: Any, max_new_tokens: int,
               concurrency: int) -> dict[str, Any]:
    """One method at one target on one set through vLLM (with its per-clip ``outputs`` and ``texts``)."""
    reducer = method.build(target)
    started = time.perf_counter()
    if reducer is None:
        inputs, saved = prepared, [0.0] * len(prepared)
    else:
        pairs = [clip.reduce_audio(reducer) for clip in prepared]
        inputs, saved = [pair[0] for pair in pairs], [pair[1].flops_reduction for pair in pairs]
    reduce_s = time.perf_counter() - started
    completions, wall = client.complete_many([clip.kwargs["inputs_embeds"][0] for clip in inputs], max_new_tokens,
                                             concurrency)
    texts = [completion.text for completion in completions]
    outputs = [label_of(text, evalset.labels) for text in texts] if evalset.labels else texts
    record = TASK_RECORDS[evalset.task]
    scores = task_scores(evalset.task, [item.reference for item in evalset.items], outputs)
    return {"engine": "vllm", "data": evalset.name, "task": evalset.task, "clips": len(evalset),
            "method": method.name, "target": target, "flops_reduction": statistics.mean(saved),
            "metric_name": record.metric, "metric": scores[record.metric],
            "requests_per_s": len(evalset) / (wall + reduce_s),
            "tokens_per_s": sum(c.tokens for c in completions) / (wall + reduce_s),
            "ttft_ms_median": 1000 * statistics.median(c.ttft_s for c in completions),
            "concurrency": concurrency, "max_new_tokens": max_new_tokens,
            "audio_tokens": statistics.mean(clip.audio_tokens for clip in inputs), "outputs": outputs,
            "texts": texts}


def vllm_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    header = ("| data | method | target | FLOPs saved | audio tokens | metric | fidelity | req/s | tok/s | TTFT ms "
              "| transformers req/s | = transformers |")
    lines = [header, "|" + "---|" * 12]
    for row in rows:
        if row.get("unreachable"):
            lines.append(f"| {row['data']} ({row['clips']}) | {row['method']} | {row['target']:.0%} | — |" + " |" * 8)
            continue

        def cell(key: str, digits: int = 3) -> str:
            value = row.get(key)
            return "—" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

        lines.append(f"| {row['data']} ({row['clips']}) | {row['method']} | {row['target']:.0%} | "
                     f"{row['flops_reduction']:.1%} | {row['audio_tokens']:.0f} | {row['metric_name']} "
                     f"{cell('metric')} | {cell('fidelity')} | {cell('requests_per_s', 2)} | {cell('tokens_per_s', 1)} "
                     f"| {cell('ttft_ms_median', 0)} | {cell('transformers_requests_per_s', 2)} "
                     f"| {cell('transformers_agreement', 2)} |")
    return "\n".join(lines)





def vllm_throughput(model: Any, clips: list, methods: list[Method], lengths: tuple[float, ...],
                    targets: tuple[float, ...], connect: Callable[[], Any], requests: int = 16,
                    max_new_tokens: int = 16, progress: bool = True) -> list[dict[str, Any]]:
    """Throughput on long audio: ``requests`` different clips of each length (real clips rotated, joined and tiled),
    unreduced and with each pre-LLM method at each target, through the transformers loop (one clip at a time, a
    fixed ``max_new_tokens`` greedy decode; measured first, with no server running) and then through vLLM (all
    clips in flight at once).

    Args:
        model: an :class:`~speechtrim.bench.runner.EmbeddedModel`.
        clips: real clips to build the long audio from.
        methods: the unreduced model and pre-LLM methods.
        lengths: audio lengths in seconds.
        targets: FLOPs targets of the reduced runs.
        connect: a context-manager factory yielding a :class:`~speechtrim.engines.vllm.VLLMClient`.
        requests: clips per length, sent concurrently.
        max_new_tokens: tokens generated per clip.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from speechtrim.bench.runner import run_item
    from speechtrim.bench.scaling import long_audio
    from speechtrim.eval.harness import EvalItem
    from speechtrim.prompts import ASR_PROMPT

    runs = [(method, target) for method in methods for target in (targets if method.reducer else (0.0,))]
    pending = []  # (row, inputs) waiting for vLLM
    bar = tqdm(total=2 * len(lengths) * len(runs), desc="throughput", unit="run", disable=not progress)
    for seconds in lengths:
        items = [EvalItem(f"long{seconds:g}-{i}", long_audio(clips[i % len(clips):] + clips[: i % len(clips)],
                                                              seconds), "", ASR_PROMPT) for i in range(requests)]
        prepared = [model.prepare(item) for item in items]
        for method, target in runs:
            reducer = method.build(target)
            started = time.perf_counter()
            inputs = prepared if reducer is None else [clip.reduce_audio(reducer)[0] for clip in prepared]
            reduce_s = time.perf_counter() - started
            started = time.perf_counter()
            local = [run_item(model, clip, None, max_new_tokens=max_new_tokens, stop_at_eos=False)
                     for clip in inputs]
            local_s = time.perf_counter() - started + reduce_s
            row = {"seconds": seconds, "method": method.name, "target": target, "requests": requests,
                   "audio_tokens": statistics.mean(clip.audio_tokens for clip in inputs),
                   "transformers_requests_per_s": requests / local_s,
                   "transformers_tokens_per_s": sum(run.decode_steps + 1 for run in local) / local_s,
                   "transformers_ttft_ms_median": 1000 * statistics.median(run.prefill_s for run in local),
                   "reduce_ms_per_clip": 1000 * reduce_s / requests, "reduce_s": reduce_s}
            pending.append((row, inputs))
            bar.update(1)
    rows: list[dict[str, Any]] = []
    with connect() as client:
        client.check()
        for row, inputs in pending:
            completions, wall = client.complete_many([clip.kwargs["inputs_embeds"][0] for clip in inputs],
                                                     max_new_tokens, requests, fixed_length=True)
            reduce_s = row.pop("reduce_s")
            row.update({"vllm_requests_per_s": requests / (wall + reduce_s),
                        "vllm_tokens_per_s": sum(c.tokens for c in completions) / (wall + reduce_s),
                        "vllm_ttft_ms_median": 1000 * statistics.median(c.ttft_s for c in completions)})
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def throughput_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`vllm_throughput` rows."""
    lines = ["| audio | method | target | audio tokens | vLLM req/s | vLLM tok/s | vLLM TTFT ms | transformers req/s "
             "| transformers tok/s | transformers TTFT ms | reduce ms/clip |", "|" + "---|" * 11]
    for row in rows:
        lines.append(f"| {row['seconds']:g} s x {row['requests']} | {row['method']} | {row['target']:.0%} | "
                     f"{row['audio_tokens']:.0f} | {row['vllm_requests_per_s']:.2f} | {row['vllm_tokens_per_s']:.1f} | "
                     f"{row['vllm_ttft_ms_median']:.0f} | {row['transformers_requests_per_s']:.2f} | "
                     f"{row['transformers_tokens_per_s']:.1f} | {row['transformers_ttft_ms_median']:.0f} | "
                     f"{row['reduce_ms_per_clip']:.1f} |")
    return "\n".join(lines)

__all__ = ["label_of", "run_vllm_sweep", "throughput_table", "vllm_methods", "vllm_table", "vllm_throughput"]
