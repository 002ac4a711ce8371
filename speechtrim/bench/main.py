"""``speechtrim bench``: presets, the sweep or the scaling study, and the files it writes.

Files in the output folder: ``results.jsonl`` (one row per method x target, appended as each finishes: a rerun
resumes), ``tables.md`` (FastAdaSP Tables 2/3/9 shape), ``tradeoff.png`` (metric vs measured FLOPs reduction), and
for ``--scaling`` ``scaling-rows.jsonl`` (each length's two rows appended as it finishes, keyed by what made them:
a rerun resumes), ``scaling.jsonl`` (this run's rows in order) and ``scaling.md``.
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
        batch_size: clips run together as one left-padded batch (``SweepConfig.batch_size``).
        task_targets: targets of one task's sets in place of ``targets`` (``SweepConfig.task_targets``); ``--targets``
            replaces both.
    """

    data: tuple[tuple[str, int | None], ...]
    targets: tuple[float, ...]
    max_new_tokens: int
    repeats: int
    batch_size: int = 1
    task_targets: tuple[tuple[str, tuple[float, ...]], ...] = ()


BATCH_SIZE = 8  # the presets' batches: see BENCHMARKS.md "Batched sweeps" for what batching costs and saves here
PRESETS = {  # ASR on real and held-out synthetic speech, emotion on held-out synthetic prosody
    # quick: two targets a set, so that it runs in under 3 minutes on 2 cores (BENCHMARKS.md "`--quick` in under 3
    # minutes"): ASR at 30 and 50 %; emotion at 10 and 30 %, since its prompts (a third of them audio) leave every
    # method that saves prefill short of 30 %. The default sweeps 10-50 % on every set.
    "quick": Preset((("pocketsphinx", 4), ("synthetic-asr", 4), ("synthetic-emotion", 8)), (0.3, 0.5), 32, 1,
                    BATCH_SIZE, (("emotion", (0.1, 0.3)),)),
    "default": Preset((("pocketsphinx", 10), ("synthetic-asr", 24), ("synthetic-emotion", 48)),
                      (0.1, 0.2, 0.3, 0.4, 0.5), 40, 1, BATCH_SIZE),
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
        batch_budget_gb: budget of the measured largest batch of ``--scaling`` (0: measure no memory).
        batch_lengths: audio lengths whose largest batch ``--scaling`` searches (None: the longest).
        progress: show progress bars.
        threads: torch CPU threads (None = torch's default); 1 avoids thread thrashing on a busy machine.
        engine: "transformers" (every method, in this process) or "vllm" (pre-LLM methods, served by vLLM).
        vllm_url: a running vLLM server (None: start one from .venv-vllm for the run).
        concurrency: requests in flight at once with the vLLM engine.
        batch_size: clips run together as one left-padded batch (None: the preset's; 1: each clip alone, the
            per-clip latency protocol of FastAdaSP's Table 4).
        beams: beams of the transcripts scored (1: greedy, the timed pass's own text); more run a beam search per
            batch and row after the timed greedy pass (``SweepConfig.decoding``).
        ctc_weight: with beams, the weight of the model's CTC head in choosing among them (0: the LLM's best).
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
    batch_budget_gb: float = 4.0
    batch_lengths: tuple[float, ...] | None = None
    progress: bool = True
    threads: int | None = None
    engine: str = "transformers"
    vllm_url: str | None = None
    concurrency: int = 16
    batch_size: int | None = None
    beams: int = 1
    ctc_weight: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_LAYER = 2


def _layer(option: str | None, decoder: Any) -> tuple[int, str]:
    """The integer first reduction layer and where it came from: "given", "auto: <selection file>" or "default".

    No ``--layer`` takes the stored transfer-entropy selection when there is one, else layer 2; "auto" requires one.
    """
    from speechtrim.hf.layers import text_backbone
    from speechtrim.layer_store import stored_selection

    depth = text_backbone(decoder).depth
    if option not in (None, "auto") and not 0 <= int(option) < depth:
        raise ValueError(f"--layer {option} is outside the model's {depth} decoder layers; pass 0 to {depth - 1}")

    if option is None or option == "auto":
        found = stored_selection(decoder, required=option == "auto")  # "auto" with none stored: says how to make one
        if found is None:
            return DEFAULT_LAYER, "default"
        return found[0], f"auto: {found[1]}"
    try:
        return int(option), "given"
    except ValueError:
        raise ValueError(f"--layer takes a layer number or 'auto', got {option!r}") from None


def _check_options(options: BenchOptions) -> Preset:
    """Refuse every bad option before anything is loaded, with the fix in the message."""
    import math
    import re

    if options.preset not in PRESETS:
        raise ValueError(f"unknown preset {options.preset!r}; use one of {sorted(PRESETS)}")
    if options.limit is not None and options.limit < 1:
        raise ValueError(f"--limit must be >= 1 clip, got {options.limit}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", options.device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {options.device!r}")
    if options.targets is not None:
        bad = [t for t in options.targets if not (math.isfinite(t) and 0.0 < t < 1.0)]
        if bad or not options.targets:
            raise ValueError(f"--targets takes FLOPs reductions in (0, 1) such as 0.1,0.3,0.5; got "
                             f"{list(options.targets) or 'none'}")
    for name, value in (("--max-new-tokens", options.max_new_tokens), ("--repeats", options.repeats),
                        ("--batch-size", options.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if options.scaling:
        bad = [s for s in options.scaling_lengths if not (math.isfinite(s) and s > 0)]
        if bad or not options.scaling_lengths:
            raise ValueError(f"--scaling-lengths takes audio lengths in seconds such as 30,60,120; got "
                             f"{list(options.scaling_lengths) or 'none'}")
        if not (math.isfinite(options.batch_budget_gb) and options.batch_budget_gb >= 0):
            raise ValueError(f"--batch-budget-gb must be >= 0 (0: no memory measurement), got "
                             f"{options.batch_budget_gb}")
        stray = sorted(set(options.batch_lengths or ()) - set(options.scaling_lengths))
        if stray:
            raise ValueError(f"--batch-lengths {stray} are not among --scaling-lengths "
                             f"{list(options.scaling_lengths)}; pick lengths the study runs")
    if options.layer is not None and options.layer != "auto":
        try:
            layer = int(options.layer)
        except ValueError:
            raise ValueError(f"--layer takes a layer number or 'auto', got {options.layer!r}") from None
        if layer < 0:
            raise ValueError(f"--layer must be >= 0 or 'auto', got {layer}")
    if options.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    if options.engine not in ("transformers", "vllm"):
        raise ValueError(f"--engine must be transformers or vllm, got {options.engine!r}")
    from speechtrim.models.joint_decoding import check_decoding

    try:
        check_decoding(options.beams, options.ctc_weight)
    except ValueError as error:
        raise ValueError(f"--beams {options.beams} --ctc-weight {options.ctc_weight}: {error}") from None
    if (options.batch_size or 1) > 1 and (options.scaling or options.engine == "vllm"):
        raise ValueError("--batch-size applies to the sweep on the transformers engine; --scaling searches its own "
                         "largest batch (--batch-budget-gb) and --engine vllm batches by --concurrency: drop "
                         "--batch-size")
    if options.beams > 1 and (options.scaling or options.engine == "vllm"):
        raise ValueError("--beams applies to the sweep's transcripts on the transformers engine; --scaling times a "
                         "fixed-length greedy decode and --engine vllm decodes greedily: drop --beams/--ctc-weight")
    if options.engine == "vllm":
        if options.model != "embedded":
            raise ValueError("--engine vllm serves speechtrim's SpeechLM (it computes the prompt embeddings itself): "
                             "use the embedded model or --speechlm FOLDER; serve a hub speech LLM with vLLM directly")
        if options.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {options.concurrency}")
        if options.vllm_url is None:
            from speechtrim.engines.vllm import vllm_python

            vllm_python()  # the environment must exist before anything slow starts
    elif options.vllm_url is not None:
        raise ValueError("--vllm-url only applies with --engine vllm")
    if options.threads is not None:
        if options.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {options.threads}")
        import torch

        torch.set_num_threads(options.threads)
    return PRESETS[options.preset]


def _packaged_depth(options: BenchOptions) -> int | None:
    """Decoder layers of the embedded default's LLM, read from its converted config alone (no weights loaded);
    None for other models, whose depth is checked once they are loaded."""
    if options.model != "embedded" or options.speechlm is not None:
        return None
    from speechtrim.assets.llm import PACKAGED_LLMS, llm_cache_dir
    from speechtrim.bench.runner import EMBEDDED_WEIGHTS

    try:
        llm = json.loads((EMBEDDED_WEIGHTS / "speechlm.json").read_text())["llm"]
        config = json.loads((llm_cache_dir(llm) / "config.json").read_text()) if llm in PACKAGED_LLMS else None
    except (OSError, KeyError, ValueError):
        return None
    return int(config["num_hidden_layers"]) if config else None


def run_bench(options: BenchOptions, model: Any = None) -> dict[str, Any]:
    """Run the sweep (or the scaling study), write its files, and return the JSON summary.

    Args:
        options: what to run.
        model: an already loaded bench model (tests pass a tiny one); None loads ``options.model``.
    """
    from speechtrim.bench.sweep import SweepConfig, has_ctc_head, select_methods

    preset = _check_options(options)
    # Validate every name before loading anything heavy: method names, the layer, then data.
    chosen = select_methods(options.methods, 2, ctc_head=options.model == "embedded")
    if options.engine == "vllm":
        from speechtrim.bench.vllm_bench import vllm_methods

        vllm_methods(chosen, named=options.methods is not None)
    depth = _packaged_depth(options) if model is None else None
    if depth is not None and options.layer not in (None, "auto") and int(options.layer) >= depth:
        raise ValueError(f"--layer {options.layer} is outside the model's {depth} decoder layers; pass 0 to {depth - 1}")
    engine = "" if options.engine == "transformers" else f"{options.engine}-"
    out = Path(options.out) if options.out is not None else Path("results") / f"bench-{engine}{options.preset}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; bench writes a folder (results.jsonl, tables.md, tradeoff.png): "
                         "pass a folder path")
    if options.scaling and options.engine == "vllm":
        if model is None:
            from speechtrim.bench.runner import load_bench_model

            model = load_bench_model(options.model, options.speechlm, options.device)
        return _run_vllm(options, out, model, [], preset)
    if options.scaling:
        return _run_scaling(options, out, model)
    from speechtrim.eval.harness import load_eval_set

    specs = [(name, options.limit) for name in options.data] if options.data else [
        (name, options.limit or limit) for name, limit in preset.data]
    sets = [load_eval_set(name, limit) for name, limit in specs]
    if model is None:
        from speechtrim.bench.runner import load_bench_model

        model = load_bench_model(options.model, options.speechlm, options.device)
    if options.engine == "vllm":
        return _run_vllm(options, out, model, sets, preset)
    if options.ctc_weight > 0 and not has_ctc_head(model):
        raise ValueError(f"--ctc-weight {options.ctc_weight} rescores beams with a CTC head over the LLM's "
                         f"vocabulary, which {model.name} does not have (speechtrim's embedded model has one): pass "
                         "--ctc-weight 0")
    batch_size = options.batch_size or preset.batch_size
    if batch_size > 1 and not getattr(model, "joins_batches", False):
        if options.batch_size is not None:
            raise ValueError(f"--batch-size {batch_size}: {model.name}'s prompts come from its processor and run one "
                             "clip at a time; use --batch-size 1")
        batch_size = 1  # the preset's batches are for speechtrim's SpeechLM
    from speechtrim.models.joint_decoding import Decoding

    config = SweepConfig(targets=tuple(options.targets or preset.targets),
                         methods=select_methods(options.methods, *_layer(options.layer, model.decoder),
                                                ctc_head=has_ctc_head(model)),
                         max_new_tokens=options.max_new_tokens or preset.max_new_tokens,
                         repeats=options.repeats or preset.repeats,
                         decoding=Decoding(options.beams, options.ctc_weight), batch_size=batch_size,
                         task_targets={} if options.targets else dict(preset.task_targets))
    jsonl = out / "results.jsonl"
    previous = out / "results.previous.jsonl"
    if options.fresh and jsonl.exists():  # set aside, never deleted: an early interrupt must not lose them
        jsonl.replace(previous)
        logger.warning("--fresh: the earlier results are kept in %s", previous)
    from speechtrim.bench.report import markdown_tables, plot, write_tables
    from speechtrim.bench.sweep import run_sweep

    this_run: list[dict] = []  # the tables describe this run's rows only, never older ones in the same file
    try:
        rows = run_sweep(model, sets, config, jsonl, progress=options.progress, on_row=this_run.append)
    finally:  # tables and plot of whatever is finished, even when interrupted
        if this_run:
            write_tables(markdown_tables(this_run, model.name), out / "tables.md")
            plot(this_run, out / "tradeoff.png", model.name)
    reused = sum(1 for row in rows if row.get("reused"))
    if reused:
        logger.warning("reused %d of %d rows from %s (same weights, clips, method, layer and settings)", reused,
                       len(rows), jsonl)
    data = ", ".join(dataset.describe() for dataset in sets)
    import torch

    return {"model": model.name, "trained": model.trained, "data": data, "device": options.device,
            "threads": torch.get_num_threads(), "max_new_tokens": config.max_new_tokens, "repeats": config.repeats,
            "decoding": config.decoding.as_dict(), "batch_size": config.batch_size,
            "jsonl": str(jsonl), "tables": str(out / "tables.md"), "plot": str(out / "tradeoff.png"),
            "reused_rows": reused, "failed_rows": sum(1 for row in rows if row.get("failed")),
            "rows": [_public(row) for row in rows]}


def _run_vllm(options: BenchOptions, out: Path, model: Any, sets: list, preset: Preset) -> dict[str, Any]:
    """The sweep on the vLLM engine: a server started for the run (or ``vllm_url``), pre-LLM methods only."""
    import contextlib

    from speechtrim.assets.cache import atomic_file
    from speechtrim.bench.sweep import has_ctc_head, select_methods
    from speechtrim.bench.vllm_bench import run_vllm_sweep, vllm_methods, vllm_table
    from speechtrim.engines.vllm import VLLMClient, VLLMServer, export_llm

    names = options.methods or (["pre_merge"] if options.scaling else None)
    methods = vllm_methods(select_methods(names, 0, ctc_head=has_ctc_head(model)), named=names is not None)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    if jsonl.exists():  # rows are not reused across vLLM runs: set the old ones aside, never delete them
        jsonl.replace(out / "results.previous.jsonl")
    url = options.vllm_url
    server = None if url is not None else VLLMServer(export_llm(model.speechlm), log_file=out / "vllm-server.log")
    url = url or server.url

    @contextlib.contextmanager
    def connect():
        """The server (started now, stopped after) and a client of it."""
        with server if server is not None else contextlib.nullcontext():
            client = VLLMClient(url)
            try:
                yield client
            finally:
                client.close()

    if options.scaling:
        return _vllm_throughput(options, out, model, methods, connect, url)
    rows = run_vllm_sweep(model, sets, methods, tuple(options.targets or preset.targets), connect, jsonl,
                          options.max_new_tokens or preset.max_new_tokens, options.concurrency, options.progress,
                          task_targets={} if options.targets else dict(preset.task_targets))
    with atomic_file(out / "tables.md") as handle:
        handle.write(f"# {model.name} served by vLLM ({url}), {options.concurrency} requests in flight\n\n"
                     f"{vllm_table(rows)}\n")
    return {"model": model.name, "engine": "vllm", "url": url, "data": ", ".join(s.describe() for s in sets),
            "jsonl": str(jsonl), "tables": str(out / "tables.md"), "rows": rows}


def _vllm_throughput(options: BenchOptions, out: Path, model: Any, methods: list, connect: Any,
                     url: str) -> dict[str, Any]:
    """``--engine vllm --scaling``: throughput of ``concurrency`` long clips, vLLM vs the transformers loop."""
    from speechtrim.assets.cache import atomic_file
    from speechtrim.bench.vllm_bench import throughput_table, vllm_throughput
    from speechtrim.data.realspeech import load_pocketsphinx_clips

    clips = [utterance.load() for utterance in load_pocketsphinx_clips()]
    rows = vllm_throughput(model, clips, methods, tuple(options.scaling_lengths), tuple(options.targets or (0.3, 0.5)),
                           connect, options.concurrency, options.max_new_tokens or 16, options.progress)
    with atomic_file(out / "throughput.jsonl") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    table = throughput_table(rows)
    with atomic_file(out / "throughput.md") as handle:
        handle.write(f"# {model.name}: {options.concurrency} concurrent clips, vLLM ({url}) vs the transformers "
                     "loop (one clip at a time; its TTFT is the clip's prefill alone)\n\n" + table + "\n")
    return {"model": model.name, "engine": "vllm", "scaling": True, "url": url,
            "table": str(out / "throughput.md"), "rows": rows}


def _public(row: dict) -> dict:
    """A row for the summary line: the documented keys and the useful extras, without per-clip outputs."""
    drop = ("outputs", "tokens_per_layer", "cache_tokens_per_layer", "key")
    return {key: value for key, value in row.items() if key not in drop}


def _run_scaling(options: BenchOptions, out: Path, model: Any) -> dict[str, Any]:
    from speechtrim.assets.cache import atomic_file
    from speechtrim.bench.scaling import MemoryPlan, scaling_study, scaling_table
    from speechtrim.bench.sweep import has_ctc_head, select_methods

    memory = None
    if options.batch_budget_gb > 0:  # children load the model from these options, not from ``model``
        memory = MemoryPlan(options.model, str(options.speechlm) if options.speechlm else None, options.device,
                            options.batch_budget_gb, options.batch_lengths, threads=options.threads)
    if model is None:
        from speechtrim.bench.runner import load_bench_model

        model = load_bench_model(options.model, options.speechlm, options.device)
    from speechtrim.data.realspeech import load_pocketsphinx_clips

    clips = [utterance.load() for utterance in load_pocketsphinx_clips()]
    names = options.methods or ["fastadasp-sparse"]
    methods = [m for m in select_methods(names, *_layer(options.layer, model.decoder), ctc_head=has_ctc_head(model))
               if m.reducer is not None]
    if len(methods) != 1:
        raise ValueError(f"--scaling compares one method with the unreduced model; got {[m.name for m in methods]}")
    target = (options.targets or (0.5,))[0]
    from speechtrim.bench.runner import frozen_long_lived

    with frozen_long_lived():  # the model's objects out of the per-run garbage collections
        rows = scaling_study(model, clips, methods[0], options.scaling_lengths, target,
                             options.max_new_tokens or 16, options.repeats or 1, options.memory_budget_gb,
                             options.progress, memory, store=out / "scaling-rows.jsonl")
    with atomic_file(out / "scaling.jsonl") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    table = scaling_table(rows)
    with atomic_file(out / "scaling.md") as handle:
        handle.write(f"# Scaling study: {model.name} on {options.device}\n\n{table}\n")
    return {"model": model.name, "trained": model.trained, "data": "pocketsphinx clips concatenated (real speech)",
            "device": options.device, "scaling": True, "table": str(out / "scaling.md"), "rows": rows}
