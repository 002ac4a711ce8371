"""Markdown tables shaped like FastAdaSP's Tables 2, 3 and 9 (methods x FLOPs reduction) and the trade-off plot.

Per data set: the task metric, the fidelity to the unreduced model and the measured prefill-FLOPs reduction, each
as a methods x target table with the unreduced model ("Full Token Baseline") on top; then a system-metrics table
(Table 4 style) of every row. Both files are written atomically.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speechtrim.assets.cache import atomic_file
from speechtrim.eval.harness import TASK_RECORDS

logger = logging.getLogger(__name__)

PEAK_MEMORY_NOTE = ("peak MB = torch.cuda.max_memory_allocated during prefill + decode of one clip (max over clips); "
                    "n/a on CPU, where no per-row peak is measured")


def _cell(value: Any, percent: bool = False, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _groups(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["data"], row["task"]), []).append(row)
    return groups


def _with_interval(row: dict, field: str, percent: bool) -> str:
    """A score cell, with its 95 % bootstrap interval over clips when the row has one: ``12.3 [8.1–17.0]``."""
    cell = _cell(row.get(field), percent)
    interval = row.get(f"{field}_ci")
    if interval is None or row.get(field) is None:
        return cell
    low, high = (_cell(float(value), percent, 1) for value in interval)
    return f"{cell} [{low}–{high}]"


def _grid(rows: list[dict], field: str, percent: bool, title: str, arrow: str) -> str:
    targets = sorted({row["target"] for row in rows if row.get("reducer") is not None})
    base = next((row for row in rows if row.get("reducer") is None), None)
    methods: list[str] = []
    for row in rows:
        if row.get("reducer") is not None and row["method"] not in methods:
            methods.append(row["method"])
    cells = {(row["method"], row["target"]): row for row in rows}
    headers = [f"{title} {arrow}"] + [f"{100 * target:.0f}%" for target in targets]
    lines = []
    if base is not None:
        lines.append(["Full Token Baseline", _with_interval(base, field, percent)] + [""] * (len(targets) - 1))
    for method in methods:
        line = [method]
        for target in targets:
            row = cells.get((method, target))
            if row is not None and row.get("failed"):
                line.append("error")
            else:
                line.append("—" if row is None or row.get("error") else _with_interval(row, field, percent))
        lines.append(line)
    return _table(headers, lines)


def markdown_tables(rows: Sequence[dict], model: str) -> str:
    """The report: per data set, metric / fidelity / measured FLOPs tables and the system-metrics table.

    Args:
        rows: sweep rows (``speechtrim.bench.sweep.run_sweep``).
        model: the model's name for the headings.
    """
    parts = []
    for (data, task), group in _groups(rows).items():
        first = group[0]
        kind = "SYNTHETIC speech" if first.get("synthetic") else "real speech"
        untrained = " — UNTRAINED projector: task metric meaningless" if first.get("trained") is False else ""
        parts.append(f"## {data} ({task}, {first.get('clips')} clips, {kind}) on {model}{untrained}\n")
        by_ratio = _ratio_keyed(group)
        keyed = f"; {', '.join(by_ratio)}: eviction ratio" if by_ratio else ""
        parts.append(f"Columns: target prefill-FLOPs reduction (FastAdaSP eq. 10{keyed}). "
                     "'—' = target unreachable; 'error' = the row failed (see results.jsonl). "
                     f"[low–high] = 95 % bootstrap interval over the {first.get('clips')} clips (1000 resamples)."
                     f"{_decoding_note(first)}\n")
        metric = first["metric_name"]
        task = TASK_RECORDS.get(first["task"])
        higher = first.get("metric_higher_is_better", task.higher_is_better if task else True)
        percent = metric in ("wer", "accuracy")
        parts.append(_grid(group, "metric", percent, f"{metric}{' %' if percent else ''}", "↑" if higher else "↓"))
        fidelity_name = first.get("fidelity_name", "fidelity")
        fidelity_up = first.get("fidelity_higher_is_better", task.fidelity_higher_is_better if task else True)
        arrow = "↑" if fidelity_up else "↓"
        parts.append("\n" + _grid(group, "fidelity", True, f"fidelity: {fidelity_name} %", arrow))
        parts.append("\n" + _grid(group, "flops_reduction", True, "measured FLOPs reduction %", ""))
        parts.append("\n" + system_table(group) + "\n")
    by_ratio = _ratio_keyed(rows)
    evictors = (f" {', '.join(by_ratio)} leave prefill unchanged (measured FLOPs reduction 0) and shrink the KV "
                "cache; as in the FastAdaSP paper, their column is their eviction ratio (share of audio entries "
                "every layer's cache drops).") if by_ratio else ""
    size = max(int(row.get("batch_size") or 1) for row in rows) if rows else 1
    batching = ("" if size == 1 else
                f"Clips ran in left-padded batches of up to {size} (shortest prompts together): a clip's prefill "
                "and decode times and KV bytes are its batch's divided by the clips in it, and tokens/s is the "
                "batch's throughput. ")
    parts.append(f"{batching}Times are medians over repeats, averaged over clips (ms per clip); RTF = (encoder + "
                 f"prefill + decode) / audio seconds; tokens/s = decode steps / decode seconds; speed-ups are "
                 f"against the unreduced model in the same process; KV MB = key + value bytes right after prefill; "
                 f"{PEAK_MEMORY_NOTE}.{evictors}")
    return "\n".join(parts)


def _decoding_note(row: dict) -> str:
    """How the scored outputs were decoded, when not by the timed greedy pass (a heading's last sentence)."""
    decoding = row.get("decoding") or {}
    beams, weight = int(decoding.get("num_beams", 1)), float(decoding.get("ctc_weight", 0.0))
    if beams <= 1:
        return ""
    chooser = f"the CTC head weighted {weight:g} choosing among them" if weight > 0 else "the LLM's best beam"
    return (f" Outputs scored: beam search, {beams} beams, {chooser} (run after the timed greedy pass; the timing "
            "columns are the greedy pass's).")


def _ratio_keyed(rows: Sequence[dict]) -> list[str]:
    """Methods whose columns are their own ratio (cache evictors), in row order."""
    return list(dict.fromkeys(row["method"] for row in rows if row.get("keyed_by") == "ratio"))


def system_table(rows: Sequence[dict]) -> str:
    """Table 4-style system metrics of every row."""
    headers = ["method", "target %", "FLOPs red. %", "RTF ↓", "encode ms", "prefill ms ↓", "decode ms ↓",
               "tokens/s ↑", "prefill ×", "decode ×", "KV MB ↓", "peak MB"]
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["method"], _cell(row["target"], True, 0), "—", "—", "", "", "", "", "", "", "", ""])
            continue
        kv = row.get("kv_cache_bytes")
        lines.append([row["method"], _cell(float(row["target"]), True, 0), _cell(row.get("flops_reduction"), True),
                      _cell(row.get("rtf"), digits=3), _cell(row.get("encode_ms"), digits=0),
                      _cell(row.get("prefill_ms"), digits=1), _cell(row.get("decode_ms"), digits=1),
                      _cell(row.get("tokens_per_s"), digits=1), _cell(row.get("prefill_speedup")),
                      _cell(row.get("decode_speedup")), _cell(kv / 2**20 if kv is not None else None, digits=2),
                      _cell(row.get("peak_mem_mb"), digits=0)])
    return _table(headers, lines)


def write_tables(text: str, path: Path) -> Path:
    """Write the markdown report atomically."""
    with atomic_file(Path(path)) as handle:
        handle.write(text + "\n")
    return Path(path)


def plot(rows: Sequence[dict], path: Path, model: str) -> Path:
    """Trade-off plot, one column per data set: task metric (top) and fidelity to the unreduced model (bottom)
    against the measured FLOPs reduction, one line per method, with 95 % bootstrap intervals as error bars.

    Args:
        rows: sweep rows.
        path: the PNG to write (atomically).
        model: the model's name for the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    groups = _groups(rows)
    columns = max(len(groups), 1)
    figure = Figure(figsize=(6 * columns, 9))
    for index, ((data, task), group) in enumerate(groups.items()):
        base = next((row for row in group if row.get("reducer") is None), None)
        methods = []
        for row in group:
            if row.get("reducer") is not None and row["method"] not in methods:
                methods.append(row["method"])
        kind = "synthetic" if group[0].get("synthetic") else "real"
        for panel, (field, label) in enumerate((("metric", group[0]["metric_name"]),
                                                ("fidelity", group[0].get("fidelity_name", "fidelity")))):
            axes = figure.add_subplot(2, columns, panel * columns + index + 1)
            for method in methods:
                points = sorted((100 * row["flops_reduction"], row[field], row.get(f"{field}_ci")) for row in group
                                if row["method"] == method and not row.get("error") and row.get(field) is not None)
                if not points:
                    continue
                x, y, intervals = zip(*points)
                low = [value - (interval or (value, value))[0] for value, interval in zip(y, intervals)]
                high = [(interval or (value, value))[1] - value for value, interval in zip(y, intervals)]
                axes.errorbar(x, y, yerr=[low, high], marker="o", capsize=2, label=method, alpha=0.85)
            if base is not None and base.get(field) is not None and field == "metric":
                axes.axhline(base[field], color="black", linestyle="--", label="full tokens")
            axes.set_title(f"{data} ({task}, {kind}, {group[0].get('clips')} clips)")
            axes.set_xlabel("measured prefill FLOPs reduction (%)")
            axes.set_ylabel(label if field == "metric" else f"fidelity: {label}")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=6)
    figure.suptitle(f"speechtrim bench: {model}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    with atomic_file(Path(path), mode="wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)
