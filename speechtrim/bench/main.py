"""``speechtrim bench``: presets, the sweep or the scaling study, and the files it writes.

Files in the output folder: ``results.jsonl`` (one row per method x target, appended as each finishes: a rerun
resumes), ``tables.md`` (FastAdaSP Tables 2/3/9 shape), ``tradeoff.png`` (metric vs measured FLOPs reduction), and
for ``--scaling`` ``scaling.jsonl`` and ``scaling.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """Sizes of a sweep.

    Args:
        data: evaluation sets with the clips each uses (None = all).
        targets: target prefill-FLOPs reductions.
        max_new_tokens: most tokens generated per clip.
        repeats: timed runs per clip (median).
    """

    data: tuple[tuple[str, int | None], ...]
    targets: tuple[float, ...]
    max_new_tokens: int
    repeats: int


PRESETS = {
    "quick": Preset((("pocketsphinx", 2),), (0.1, 0.3, 0.5), 32, 1),
    "default": Preset((("pocketsphinx", 3), ("synthetic-emotion", 4)), (0.1, 0.2, 0.3, 0.4, 0.5), 40, 1),
}


@dataclass
class BenchOptions:
    """Everything ``speechtrim bench`` can be told (None = the preset's value).

    Args:
        preset: "quick" or "default".
        data: evaluation sets ("pocketsphinx", "synthetic-asr", "synthetic-emotion", or manifest paths).
        limit: clips per set.
        methods: method names (``speechtrim.bench.sweep.select_methods``).
        targets: target prefill-FLOPs reductions.
        model: "embedded" or a Hugging Face speech LLM id / folder.
        speechlm: a saved SpeechLM folder.
        out: output folder.
        layer: first reduction layer ("auto" = transfer-entropy selection; None = auto when stored, else 2).
        max_new_tokens, repeats: generation length and timed runs.
        device: "cpu" or "cuda".
        fresh: ignore rows already in the results file.
        scaling: run the scaling study instead of the sweep.
        scaling_lengths: audio lengths of the scaling study, seconds.
        memory_budget_gb: budget of the batch-size estimate.
        progress: show progress bars.
        threads: torch CPU threads (None = torch's default); 1 avoids thread thrashing on a busy machine.
    """

    preset: str = "default"
    data: list[str] | None = None
    limit: int | None = None
    methods: list[str] | None = None
    targets: tuple[float, ...] | None = None
    model: str = "embedded"
    speechlm: Path | None = None
    out: Path | None = None
    layer: str | None = None
    max_new_tokens: int | None = None
    repeats: int | None = None
    device: str = "cpu"
    fresh: bool = False
    scaling: bool = False
    scaling_lengths: tuple[float, ...] = (30, 60, 120, 240)
    memory_budget_gb: float = 80.0
    progress: bool = True
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _layer(option: str | None, decoder: Any) -> int | str:
    if option is None:
        from speechtrim.layer_selection import selection_path

        return "auto" if selection_path(decoder).is_file() else 2
    if option == "auto":
        return "auto"
    try:
        return int(option)
    except ValueError:
        raise ValueError(f"--layer takes a layer number or 'auto', got {option!r}") from None


def _check_options(options: BenchOptions) -> Preset:
    if options.preset not in PRESETS:
        raise ValueError(f"unknown preset {options.preset!r}; use one of {sorted(PRESETS)}")
    if options.limit is not None and options.limit < 1:
        raise ValueError(f"--limit must be >= 1 clip, got {options.limit}")
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    if options.threads is not None:
        if options.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {options.threads}")
        import torch

        torch.set_num_threads(options.threads)
    return PRESETS[options.preset]


def run_bench(options: BenchOptions, model: Any = None) -> dict[str, Any]:
    """Run the sweep (or the scaling study), write its files, and return the JSON summary.

    Args:
        options: what to run.
        model: an already loaded bench model (tests pass a tiny one); None loads ``options.model``.
    """
    from speechtrim.bench.sweep import SweepConfig, select_methods

    preset = _check_options(options)
    # Validate every name before loading anything heavy: method names, then data.
    select_methods(options.methods, 2)
    out = Path(options.out) if options.out is not None else Path("results") / f"bench-{options.preset}"
    if options.scaling:
        return _run_scaling(options, out, model)
    from speechtrim.eval.harness import load_eval_set

    specs = [(name, options.limit) for name in options.data] if options.data else [
        (name, options.limit or limit) for name, limit in preset.data]
    sets = [load_eval_set(name, limit) for name, limit in specs]
    if model is None:
        from speechtrim.bench.runner import load_bench_model

        model = load_bench_model(options.model, options.speechlm, options.device)
    config = SweepConfig(targets=tuple(options.targets or preset.targets),
                         methods=select_methods(options.methods, _layer(options.layer, model.decoder)),
                         max_new_tokens=options.max_new_tokens or preset.max_new_tokens,
                         repeats=options.repeats or preset.repeats)
    jsonl = out / "results.jsonl"
    if options.fresh and jsonl.exists():
        jsonl.unlink()
    from speechtrim.bench.report import markdown_tables, plot, write_tables
    from speechtrim.bench.sweep import run_sweep

    try:
        rows = run_sweep(model, sets, config, jsonl, progress=options.progress)
    finally:  # tables and plot of whatever is finished, even when interrupted
        from speechtrim.bench.sweep import read_jsonl

        finished = [row for row in read_jsonl(jsonl).values() if row.get("model") == model.name]
        if finished:
            write_tables(markdown_tables(finished, model.name), out / "tables.md")
            plot(finished, out / "tradeoff.png", model.name)
    data = ", ".join(dataset.describe() for dataset in sets)
    import torch

    return {"model": model.name, "trained": model.trained, "data": data, "device": options.device,
            "threads": torch.get_num_threads(), "max_new_tokens": config.max_new_tokens, "repeats": config.repeats,
            "jsonl": str(jsonl), "tables": str(out / "tables.md"), "plot": str(out / "tradeoff.png"),
            "rows": [_public(row) for row in rows]}


def _public(row: dict) -> dict:
    """A row for the summary line: the documented keys and the useful extras, without per-clip outputs."""
    drop = ("outputs", "tokens_per_layer", "cache_tokens_per_layer", "key")
    return {key: value for key, value in row.items() if key not in drop}


def _run_scaling(options: BenchOptions, out: Path, model: Any) -> dict[str, Any]:
    from speechtrim.assets.cache import atomic_file
    from speechtrim.bench.scaling import scaling_study, scaling_table
    from speechtrim.bench.sweep import select_methods

    if model is None:
        from speechtrim.bench.runner import load_bench_model

        model = load_bench_model(options.model, options.speechlm, options.device)
    from speechtrim.data.realspeech import load_pocketsphinx_clips

    clips = [utterance.load() for utterance in load_pocketsphinx_clips()]
    names = options.methods or ["fastadasp-sparse"]
    methods = [m for m in select_methods(names, _layer(options.layer, model.decoder)) if m.reducer is not None]
    if len(methods) != 1:
        raise ValueError(f"--scaling compares one method with the unreduced model; got {[m.name for m in methods]}")
    target = (options.targets or (0.5,))[0]
    rows = scaling_study(model, clips, methods[0], options.scaling_lengths, target,
                         options.max_new_tokens or 16, options.repeats or 1, options.memory_budget_gb,
                         options.progress)
    with atomic_file(out / "scaling.jsonl") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    table = scaling_table(rows)
    with atomic_file(out / "scaling.md") as handle:
        handle.write(f"# Scaling study: {model.name} on {options.device}\n\n{table}\n")
    return {"model": model.name, "trained": model.trained, "data": "pocketsphinx clips concatenated (real speech)",
            "device": options.device, "scaling": True, "table": str(out / "scaling.md"), "rows": rows}
