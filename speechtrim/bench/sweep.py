"""The accuracy-vs-cost sweep: every method x target prefill-FLOPs reduction, one JSONL row each, resumable.

Methods: the unreduced model (``none``) and every registered reducer, in the schedules its class declares for
sweeps (FastAdaSP: sparse, i.e. one layer, and the dense constant and decay schedules). A reducer keyed by FLOPs
(``keyed_by="flops"``) is built with ``flops_reduction=target`` and solves its ratio per prompt; the row reports the
reduction *measured* over the per-layer lengths the reducer really produced.

Cache evictors (H2O) leave the prefill untouched and are keyed by their own ratio (``keyed_by="ratio"``): as in the
FastAdaSP paper, which lists H2O under its "FLOPs reduce" columns meaning its eviction ratio, the column value is
used as ``ratio=``, at the layers the method defaults to. Their rows report the measured prefill-FLOPs reduction
honestly (0) and the KV-cache bytes they free.

Timings: one warm-up pass, then per clip the median of ``repeats`` runs; a row's latencies are means over clips
(seconds per sentence, as the paper reports). Ratios to the unreduced model come from the baseline measured in the
same process, which every sweep runs first (its outputs are also the reference of the fidelity scores).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from speechtrim import reducers
from speechtrim.bench.runner import ItemRun, Prepared, frozen_long_lived, median_encode, run_batch
from speechtrim.eval.harness import TASK_RECORDS, EvalSet, fidelity, score_interval, task_scores
from speechtrim.models.joint_decoding import Decoding

logger = logging.getLogger(__name__)

TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5)
SCHEDULE_LABELS = {"none": "sparse"}  # row labels of a method swept in several schedules, e.g. fastadasp-sparse
LABEL_NEW_TOKENS = 8  # label tasks: the label comes from scoring; the decode timed is a short answer
ROW_KEYS = ("method", "schedule", "task", "flops_reduction", "metric_name", "metric", "fidelity", "prefill_ms",
            "decode_ms", "tokens_per_s", "rtf", "peak_mem_mb", "kv_cache_bytes")


@dataclass(frozen=True)
class Method:
    """One line of the trade-off tables.

    Args:
        name: the row label, e.g. "fastadasp-sparse".
        reducer: registry name, or None for the unreduced model.
        schedule: "none" (one layer), "constant" or "decay".
        layer: first reduction layer, "auto" (transfer-entropy selection), or None (pre-LLM methods: before layer 0).
        keyed_by: "flops": a column is a target prefill-FLOPs reduction (the ratio is solved per prompt);
            "ratio": a column is the reducer's own ratio (a cache evictor's eviction ratio); from its class.
        layer_source: where ``layer`` came from: "given", "default", or "auto: <selection file>".
    """

    name: str
    reducer: str | None
    schedule: str = "none"
    layer: int | str | None = 2
    keyed_by: str = "flops"
    layer_source: str = "given"

    def build_zero(self) -> Any:
        """The reducer attached at ratio 0 (everything but the removal): what its overhead is measured with."""
        if self.reducer is None:
            return None
        return reducers.build(self.reducer, ratio=0.0, layer=self.layer, schedule=self.schedule)

    def build_kwargs(self, target: float) -> dict[str, Any]:
        """``reducers.build`` keyword arguments of one column (what a child process rebuilds the reducer from)."""
        key = "ratio" if self.keyed_by == "ratio" else "flops_reduction"
        return {key: target, "layer": self.layer, "schedule": self.schedule}

    def build(self, target: float) -> Any:
        """The reducer for one column of the tables (None for the unreduced model)."""
        if self.reducer is None:
            return None
        return reducers.build(self.reducer, **self.build_kwargs(target))


def all_methods(layer: int | str = 2, layer_source: str = "given") -> list[Method]:
    """The unreduced model and every registered reducer, each in the schedules it declares for sweeps (FastAdaSP:
    sparse, constant and decay); the class says how its columns are keyed.

    Args:
        layer: first reduction layer of the in-decoder methods keyed by FLOPs (cache evictors keep their own
            default layer; pre-LLM methods run before layer 0).
        layer_source: where ``layer`` came from (recorded in every row).
    """
    methods = [Method("none", None, layer_source="unreduced")]
    for name in reducers.names():
        cls = reducers.REDUCERS.get(name)
        if cls.acts_on == "embeddings":
            methods.append(Method(name, name, cls.default_schedule, None, layer_source="pre-LLM"))
            continue
        schedules = cls.sweep_schedules or (cls.default_schedule,)
        for schedule in schedules:
            label = name if len(schedules) == 1 else f"{name}-{SCHEDULE_LABELS.get(schedule, schedule)}"
            if cls.keyed_by == "ratio":  # its own ratio at its own layers: FLOPs targets do not apply
                methods.append(Method(label, name, schedule, cls.default_layer, "ratio", layer_source="default"))
            else:
                methods.append(Method(label, name, schedule, layer, layer_source=layer_source))
    return methods


def has_ctc_head(model: Any) -> bool:
    """Whether a bench model has a CTC head over its LLM's vocabulary (speechtrim's vocabulary projector)."""
    return bool(getattr(getattr(model, "speechlm", None), "has_ctc_head", False))


def select_methods(names: Sequence[str] | None, layer: int | str = 2, layer_source: str = "given",
                   ctc_head: bool = True) -> list[Method]:
    """The methods named (``fastadasp`` = its three strategies); None = all. The unreduced model always comes first.

    Args:
        names: method names, e.g. ["fastadasp", "fastv"].
        layer: first reduction layer.
        layer_source: where ``layer`` came from (recorded in every row).
        ctc_head: whether the model has a CTC head over its LLM's vocabulary; without one, "all" leaves out the
            methods that read it (ctc_compress) and naming one is refused.
    """
    known = all_methods(layer, layer_source)
    if not ctc_head:
        needing = {m.name for m in known if m.reducer and getattr(reducers.REDUCERS.get(m.reducer),
                                                                     "needs_ctc_head", False)}
        asked = sorted(needing & set(names or ()))
        if asked:
            raise ValueError(f"{asked} read a CTC head over the LLM's vocabulary, which this model does not have "
                             "(speechtrim's embedded model has one); leave them out of --methods")
        known = [m for m in known if m.name not in needing]
    if not names:
        return known
    by_name = {method.name: [method] for method in known}
    by_name["fastadasp"] = [m for m in known if m.reducer == "fastadasp"]
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(by_name)}")
    chosen = [known[0]]
    for name in names:
        chosen += [method for method in by_name[name] if method not in chosen]
    return chosen


@dataclass
class SweepConfig:
    """What a sweep runs.

    Args:
        targets: target prefill-FLOPs reductions, each in (0, 1).
        methods: the methods (the unreduced model is added when missing).
        max_new_tokens: most tokens generated per clip.
        repeats: timed runs per clip (median).
        warmup: untimed runs before the first row.
        decoding: how generation tasks' outputs are decoded (greedy by default; beams, and the CTC head choosing
            among them, run once per batch after its timed greedy passes: ``run_batch(..., decoding=)``). Label
            tasks are read by scoring and ignore it.
        batch_size: clips run together as one left-padded batch (``run_batch``), shortest prompts first; a clip's
            times are an even share of its batch's. 1: each clip alone (per-clip latency, FastAdaSP's protocol).
        task_targets: targets for the sets of a task, in place of ``targets`` (``{"emotion": (0.1, 0.3)}``: prompts
            whose audio is a small share of them cannot reach deep prefill reductions).
    """

    targets: tuple[float, ...] = TARGETS
    methods: list[Method] = field(default_factory=all_methods)
    max_new_tokens: int = 32
    repeats: int = 1
    warmup: int = 1
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int = 1
    task_targets: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for targets in (self.targets, *self.task_targets.values()):
            bad = [t for t in targets if isinstance(t, bool) or not 0.0 < float(t) < 1.0]
            if bad or not targets:
                raise ValueError(f"targets must be FLOPs reductions in (0, 1), e.g. 0.1,0.3,0.5; got {list(targets)}")
        if self.max_new_tokens < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("max_new_tokens and repeats must be >= 1 and warmup >= 0, got "
                             f"{self.max_new_tokens}, {self.repeats}, {self.warmup}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not any(method.reducer is None for method in self.methods):
            self.methods = [Method("none", None, layer_source="unreduced"), *self.methods]


def data_fingerprint(data: EvalSet) -> str:
    """A hash of everything of an evaluation set that decides a row: task, labels, and per clip its samples,
    reference, prompt and assistant prefix (the set's name and file names play no part)."""
    from speechtrim.fingerprint import array_fingerprint, json_fingerprint

    return json_fingerprint({"task": data.task, "labels": list(data.labels),
                             "clips": [[array_fingerprint(item.audio), item.reference, item.prompt,
                                        item.assistant_prefix] for item in data.items]})


def row_key(model_fingerprint: str, data_hash: str, method: Method, target: float, config: SweepConfig) -> str:
    """A hash of everything that makes a row's result: the model's weights, the clips, the method with its integer
    layer, the target, the generation length, timing repeats, decoding and batch size, and the software
    versions."""
    from importlib.metadata import version

    import torch

    from speechtrim.fingerprint import json_fingerprint

    fields = {"model": model_fingerprint, "data": data_hash, "method": dataclasses.asdict(method),
              "target": round(float(target), 6), "max_new_tokens": config.max_new_tokens, "repeats": config.repeats,
              "speechtrim": version("speechtrim"), "transformers": version("transformers"), "torch": torch.__version__}
    if not config.decoding.greedy:  # greedy rows keep the keys they had before beams existed
        fields["decoding"] = config.decoding.as_dict()
    if config.batch_size > 1:  # and clips run alone keep theirs
        fields["batch_size"] = config.batch_size
    return json_fingerprint(fields)


def read_jsonl(path: Path) -> dict[str, dict]:
    """Rows already written, by key; a line that is not a complete JSON object (a write cut short) is skipped."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = _parse_row(line)
            if row is not None and "key" in row:
                rows[row["key"]] = row
    return rows


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def repair_jsonl(path: Path) -> int:
    """Drop the lines of ``path`` that are not complete JSON objects (a torn last line after a crash), rewriting
    the file atomically so it is valid JSONL again; returns how many lines were dropped."""
    from speechtrim.assets.cache import atomic_file

    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    good = [line for line in lines if line.strip() and _parse_row(line) is not None]
    dropped = sum(1 for line in lines if line.strip()) - len(good)
    if dropped:
        with atomic_file(path) as handle:
            handle.writelines(line + "\n" for line in good)
        logger.warning("%s: removed %d line(s) that were not complete JSON objects (an interrupted write); those "
                       "rows are redone", path, dropped)
    return dropped


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row and force it to disk, so an interrupted sweep keeps it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False  # a line cut short by a crash: start on a fresh line so the new row stays whole
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            torn = handle.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(("\n" if torn else "") + json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def summarise(data: EvalSet, method: Method, target: float, runs: list[ItemRun], prepared: list[Prepared],
              full: list[ItemRun] | None, decoding: Decoding | None = None, batch_size: int = 1) -> dict[str, Any]:
    """One table row from the per-clip runs (``full`` = the unreduced runs, for fidelity and ratios)."""
    outputs = [run.output for run in runs]
    scores = task_scores(data.task, [item.reference for item in data.items], outputs)
    task = TASK_RECORDS[data.task]
    metric_name, higher = task.metric, task.higher_is_better
    fidelity_name, fidelity_higher = task.fidelity, task.fidelity_higher_is_better
    reference = full if full is not None else runs
    audio_s = sum(item.seconds for item in data.items)
    prefill = [run.prefill_s for run in runs]
    decode = [run.decode_s for run in runs]
    steps = sum(run.decode_steps for run in runs)
    total = sum(p.encode_s for p in prepared) + sum(prefill) + sum(decode)
    peaks = [run.peak_mem_mb for run in runs if run.peak_mem_mb is not None]
    row: dict[str, Any] = {
        "method": method.name, "schedule": method.schedule, "layer": method.layer,
        "layer_source": method.layer_source, "reducer": method.reducer, "task": data.task, "data": data.name, "synthetic": data.synthetic, "clips": len(data),
        "target": 0.0 if method.reducer is None else float(target), "keyed_by": method.keyed_by,
        "flops_reduction": _mean([run.flops_reduction for run in runs]),
        "flops_reduction_min": float(min(run.flops_reduction for run in runs)),
        "flops_reduction_max": float(max(run.flops_reduction for run in runs)),
        "metric_name": metric_name, "metric_higher_is_better": higher, "metric": scores[metric_name],
        "scores": scores,
        "fidelity_name": fidelity_name, "fidelity_higher_is_better": fidelity_higher,
        "fidelity": fidelity(data.task, [r.output for r in reference], outputs),
        "metric_ci": score_interval(data.task, [item.reference for item in data.items], outputs),
        "fidelity_ci": score_interval(data.task, [r.output for r in reference], outputs),
        "encode_ms": 1000 * _mean([p.encode_s for p in prepared]),
        "prefill_ms": 1000 * _mean(prefill), "decode_ms": 1000 * _mean(decode),
        "tokens_per_s": steps / sum(decode) if steps and sum(decode) > 0 else None,
        "new_tokens": _mean([run.decode_steps + 1 for run in runs]),
        "rtf": total / audio_s,
        "peak_mem_mb": max(peaks) if peaks else None,
        "kv_cache_bytes": int(round(_mean([run.kv_cache_bytes for run in runs]))),
        "audio_tokens": _mean([p.audio_tokens for p in prepared]),
        "prompt_tokens": _mean([p.length for p in prepared]),
        "tokens_per_layer": runs[0].tokens_per_layer,
        "cache_tokens_per_layer": runs[0].cache_tokens_per_layer,
        "outputs": outputs,
        "decoding": (decoding or Decoding()).as_dict(),
        "batch_size": batch_size,
    }
    if decoding is not None and not decoding.greedy:
        row["search_ms"] = 1000 * _mean([run.search_s for run in runs])  # the untimed beam search, per clip
    if full is not None:
        base = summarise_times(full)
        row["prefill_speedup"] = base["prefill"] / sum(prefill) if sum(prefill) > 0 else None
        row["decode_speedup"] = base["decode"] / sum(decode) if sum(decode) > 0 else None
        row["kv_cache_ratio"] = row["kv_cache_bytes"] / base["kv"] if base["kv"] else None
        if row["tokens_per_s"] and base["tokens_per_s"]:
            row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
    return row


def summarise_times(runs: list[ItemRun]) -> dict[str, float]:
    """Total prefill and decode seconds, mean KV bytes and decode tokens/s of a list of runs."""
    decode = sum(run.decode_s for run in runs)
    steps = sum(run.decode_steps for run in runs)
    return {"prefill": sum(run.prefill_s for run in runs), "decode": decode,
            "kv": _mean([run.kv_cache_bytes for run in runs]),
            "tokens_per_s": steps / decode if steps and decode > 0 else 0.0}


def run_sweep(model: Any, sets: Sequence[EvalSet], config: SweepConfig, jsonl: Path, progress: bool = True,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every (data set, method, target) not yet in ``jsonl``; append each row as soon as it is done.

    Args:
        model: an :class:`~speechtrim.bench.runner.EmbeddedModel` or :class:`~speechtrim.bench.runner.HubModel`.
        sets: evaluation sets.
        config: methods, targets, generation length, repeats.
        jsonl: the results file (created or extended; rows already there are reused, not rerun).
        progress: show a progress bar.
        on_row: called with each finished row (new or reused).
    Returns:
        every row of this sweep, in order (reused rows included).
    """
    repair_jsonl(jsonl)
    done = read_jsonl(jsonl)
    reduced = [m for m in config.methods if m.reducer is not None]
    weights = model.fingerprint
    hashes = {id(data): data_fingerprint(data) for data in sets}

    def own_config(data: EvalSet) -> SweepConfig:
        own = dataclasses.replace(config, targets=tuple(config.task_targets.get(data.task, config.targets)))
        if data.candidates:  # label tasks decode a short answer only, and read the label by scoring
            return dataclasses.replace(own, max_new_tokens=min(config.max_new_tokens, LABEL_NEW_TOKENS),
                                       decoding=Decoding())
        return own

    plan = [(data, method, target) for data in sets for method in reduced for target in own_config(data).targets]
    todo = sum(row_key(weights, hashes[id(d)], m, t, own_config(d)) not in done for d, m, t in plan)
    bar = tqdm(total=todo + len(sets), desc="bench", unit="row", disable=not progress)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    try:
        with frozen_long_lived():  # the model's objects out of the per-run garbage collections
            for data in sets:
                _sweep_set(model, data, own_config(data), config, hashes[id(data)], done, jsonl, bar, emit)
    finally:
        bar.close()
    return rows


def _sweep_set(model: Any, data: EvalSet, own: SweepConfig, config: SweepConfig, data_hash: str, done: dict,
               jsonl: Path, bar: Any, emit: Callable[[dict], None]) -> None:
    """One data set's rows: encode once, warm up, the unreduced reference, then every (method, target) not done."""
    weights, candidates = model.fingerprint, data.candidates
    reduced = [m for m in config.methods if m.reducer is not None]
    bar.set_postfix_str(f"{data.name}: encoding")
    prepared = [median_encode(model, item, own.repeats) for item in data.items]  # the same for every row
    batches = _batches(prepared, own.batch_size)
    for _ in range(config.warmup):  # warm-up: unreduced and one reducer, untimed
        run_batch(model, [prepared[i] for i in batches[0]], None, candidates, own.max_new_tokens)
        if reduced:
            _safe_run(model, [prepared[i] for i in batches[0]], reduced[0].build(own.targets[0]), candidates,
                      own.max_new_tokens)
    bar.set_postfix_str(f"{data.name}: none")
    full = _run_clips(model, prepared, None, candidates, own)
    bar.update(1)
    base_method = next(m for m in config.methods if m.reducer is None)
    key = row_key(weights, data_hash, base_method, 0.0, own)
    row = {**summarise(data, base_method, 0.0, full, prepared, full, own.decoding, own.batch_size), "key": key,
           "model": model.name, "trained": model.trained}
    if key not in done:
        append_jsonl(jsonl, row)
    emit({**done[key], "reused": True} if key in done else row)
    for method in reduced:
        for target in own.targets:
            key = row_key(weights, data_hash, method, target, own)
            if key in done:
                emit({**done[key], "reused": True})
                continue
            bar.set_postfix_str(f"{data.name}: {method.name} {target:.0%}")
            row = _measure(model, data, method, target, prepared, full, own)
            row.update(key=key, model=model.name, trained=model.trained)
            append_jsonl(jsonl, row)
            emit(row)
            bar.update(1)


def _batches(prepared: list[Prepared], size: int) -> list[list[int]]:
    """Clip indices in batches of ``size``: in order for 1, else shortest prompts first (least padding)."""
    order = list(range(len(prepared)))
    if size > 1:
        order.sort(key=lambda index: prepared[index].length)
    return [order[start : start + size] for start in range(0, len(order), size)]


def _run_clips(model: Any, prepared: list[Prepared], reducer: Any, candidates: list[str] | None,
               config: SweepConfig) -> list[ItemRun]:
    """Every clip's run, in the clips' order, run in batches of ``config.batch_size``."""
    runs: list[ItemRun | None] = [None] * len(prepared)
    for indices in _batches(prepared, config.batch_size):
        batch = run_batch(model, [prepared[i] for i in indices], reducer, candidates, config.max_new_tokens,
                          config.repeats, decoding=config.decoding)
        for index, run in zip(indices, batch):
            runs[index] = run
    return runs  # type: ignore[return-value]


def _safe_run(model: Any, prepared: list[Prepared], reducer: Any, candidates: list[str] | None, max_new: int) -> None:
    try:
        run_batch(model, prepared, reducer, candidates, max_new)
    except ValueError as error:
        logger.info("warm-up with a reducer failed (%s); continuing", error)


def _measure(model: Any, data: EvalSet, method: Method, target: float, prepared: list[Prepared],
             full: list[ItemRun], config: SweepConfig) -> dict[str, Any]:
    """One row. A reducer that cannot reach the target on some clip gives a row with ``error`` (shown as '—');
    any other ValueError gives a row with ``failed`` (shown as 'error' and counted in the exit status)."""
    from speechtrim.flops import TargetUnreachable

    reducer = method.build(target)
    try:
        runs = _run_clips(model, prepared, reducer, data.candidates, config)
    except ValueError as error:
        unreachable = isinstance(error, TargetUnreachable)
        (logger.info if unreachable else logger.error)("%s at %.0f%% on %s: %s", method.name, 100 * target,
                                                         data.name, error)
        metric_name = TASK_RECORDS[data.task].metric
        return {"method": method.name, "schedule": method.schedule, "layer": method.layer,
                "layer_source": method.layer_source, "reducer": method.reducer, "task": data.task,
                "data": data.name, "synthetic": data.synthetic, "clips": len(data), "target": float(target),
                "error": str(error), "failed": not unreachable, "metric_name": metric_name,
                **{key: None for key in ROW_KEYS if key not in ("method", "schedule", "task", "metric_name")}}
    return summarise(data, method, target, runs, prepared, full, config.decoding, config.batch_size)
