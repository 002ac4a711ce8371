"""The ``speechtrim`` command line: one console script, one sub-command per job.

Every command prints tables for people and ends with one JSON line for machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("speechtrim")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``speechtrim`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: object) -> None:  # timeout, CI and container stops: handled like Ctrl-C
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _quiet_libraries(args)
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"speechtrim {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"speechtrim {args.command}: {how}; finished work is kept (rerun the same command to resume)",
              file=sys.stderr)
        return 143 if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _reducer_names() -> list[str]:
    from speechtrim import reducers

    return reducers.names()


def _adapter_names() -> list[str]:
    from speechtrim import adapters

    return adapters.names()


def _quiet_libraries(args: argparse.Namespace) -> None:
    """Without ``-v``, transformers' warnings stay out of the output; ``--no-progress`` also hides its bars."""
    from transformers.utils import logging as transformers_logging

    if not args.verbose:
        transformers_logging.set_verbosity_error()
    if getattr(args, "no_progress", False):
        transformers_logging.disable_progress_bar()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechtrim",
        description="Cut the audio tokens a speech LLM processes: length adapters and training-free token reducers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_assets(commands)
    _add_transcribe(commands)
    _add_select_layer(commands)
    _add_adapter_commands(commands)
    _add_train_embedded(commands)
    _add_bench(commands)
    _add_serve(commands)
    return parser


def _add_serve(commands: Any) -> None:
    """``serve``: a vLLM server for a SpeechLM's LLM, with prompt embeddings enabled."""
    serve = commands.add_parser(
        "serve", help="serve the embedded model's LLM (or --speechlm's) on vLLM with prompt embeddings, on loopback, "
                      "until Ctrl-C; `speechtrim bench --engine vllm --vllm-url URL` then sends it the audio")
    serve.add_argument("--speechlm", type=Path, default=None, help="a saved SpeechLM folder (default: the embedded)")
    serve.add_argument("--port", type=int, default=8000, help="loopback port (default 8000)")
    serve.add_argument("--max-model-len", type=int, default=4096, help="longest prompt + answer in tokens")
    serve.add_argument("--dtype", default="float32", help="weights' dtype on the server (float32 on CPU)")
    serve.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    serve.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from speechtrim.engines.vllm import VLLMServer, export_llm, vllm_python

    vllm_python()  # the environment first: its absence is the likeliest failure
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    speechlm = _embedded_speechlm(args.speechlm)
    server = VLLMServer(export_llm(speechlm), port=args.port, max_model_len=args.max_model_len, dtype=args.dtype,
                        startup_timeout=args.startup_timeout)
    with server:
        print(f"vLLM serves {server.model_folder} at {server.url} (log: {server.log_file}); Ctrl-C stops it",
              file=sys.stderr)
        print(json.dumps({"command": "serve", "url": server.url, "model": str(server.model_folder),
                          "log": str(server.log_file)}), flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            return 130
    raise RuntimeError(f"the vLLM server stopped; its log ({server.log_file}) ends with:\n{server.log_tail()}")


def _add_assets(commands: Any) -> None:
    """``assets``: list, prepare or inspect the packaged weights."""
    assets = commands.add_parser("assets", help="list, prepare or inspect the packaged offline model weights")
    assets.add_argument("action", choices=["list", "prepare", "status"], help="what to do")
    assets.add_argument("names", nargs="*", help="asset names (default: all)")
    assets.set_defaults(run=_run_assets)


def _add_transcribe(commands: Any) -> None:
    """``transcribe``: Whisper transcripts and their WER."""
    transcribe = commands.add_parser(
        "transcribe",
        help="transcribe speech with a Whisper model and score it (default: the real pocketsphinx clips)",
    )
    transcribe.add_argument("audio", nargs="*", help="audio files to transcribe (default: the real pocketsphinx clips)")
    transcribe.add_argument("--model", default="tiny.en", help="packaged Whisper name (tiny.en, base), hub id or folder")
    transcribe.add_argument("--language", default=None, help="language code for multilingual models, e.g. en")
    transcribe.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    transcribe.add_argument("--output", type=Path, default=None, help="also write one JSON line per clip to this file")
    transcribe.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    transcribe.add_argument("--no-progress", action="store_true", help="hide progress bars")
    transcribe.set_defaults(run=_run_transcribe)


def _add_select_layer(commands: Any) -> None:
    """``select-layer``: transfer-entropy layer selection."""
    select = commands.add_parser(
        "select-layer",
        help="rank decoder layers by transfer entropy (FastAdaSP eqs. 7-8) and store the best for layer='auto'",
    )
    select.add_argument("--speechlm", type=Path, default=None,
                        help="a saved SpeechLM folder (default: the embedded default; an untrained projector if none)")
    select.add_argument("--data", default="pocketsphinx", choices=["pocketsphinx", "synthetic-emotion"],
                        help="calibration clips")
    select.add_argument("--clips", type=int, default=8, help="calibration clips to use")
    select.add_argument("--method", default="fastadasp",
                        help=f"reducer whose operation is measured: {', '.join(_reducer_names())}")
    select.add_argument("--ratio", type=float, default=0.5, help="its merge ratio during calibration")
    select.add_argument("--layers", default=None, help="candidate layers, e.g. 1-10 or 2,3,9 (default: all but 0)")
    select.add_argument("--force", action="store_true",
                        help="replace a stored selection even when it was calibrated on more clips or layers")
    select.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    select.add_argument("--no-progress", action="store_true", help="hide progress bars")
    select.set_defaults(run=_run_select_layer)


def _add_adapter_commands(commands: Any) -> None:
    """``train`` and ``compare-adapters``: the length adapters' cross-validation."""
    for name, helptext in (("train", "cross-validate one length adapter for emotion recognition"),
                           ("compare-adapters", "cross-validate every length adapter and the text-only baseline")):
        sub = commands.add_parser(name, help=helptext)
        if name == "train":
            sub.add_argument("--adapter", required=True, help=f"length adapter: {', '.join(_adapter_names())}")
            sub.add_argument("--save", type=Path, default=None, help="also train on all data and save the model here")
        else:
            sub.add_argument("--adapters", default=",".join(("none", "mean", "concat", "conv", "attn_mean",
                                                              "attn_q_mean")), help="comma-separated adapters")
        sub.add_argument("--data", default="synthetic-emotion",
                         help="synthetic-emotion, emodb:DIR, ravdess:DIR, or a .csv/.jsonl manifest")
        sub.add_argument("--preset", default="quick", choices=["quick", "paper"],
                         help="quick: CPU-sized (96 clips, 2 folds, 3 epochs, higher learning rate); paper: Annex A")
        sub.add_argument("--folds", type=int, default=None, help="override the preset's fold count")
        sub.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
        sub.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
        sub.add_argument("--adapter-lr", type=float, default=None,
                         help="override the preset's learning rate of the adapter's own weights")
        sub.add_argument("--lr-schedule", choices=["constant", "linear"], default=None,
                         help="override the preset's learning-rate schedule")
        sub.add_argument("--seed", type=int, default=0, help="seed of folds, initialisation and shuffling")
        sub.add_argument("--encoder", default="base", help="Whisper name for the encoder and transcripts")
        sub.add_argument("--llm", default="smollm2-135m", help="frozen LLM name")
        sub.add_argument("--out", type=Path, default=None, help="results folder (default: results/<command>-<data>)")
        sub.set_defaults(run=_run_adapters)


def _add_train_embedded(commands: Any) -> None:
    """``train-embedded``: train the embedded speech LLM."""
    embedded = commands.add_parser(
        "train-embedded",
        help="train the embedded speech LLM (Whisper base -> vocabulary projector -> SmolLM2 with LoRA) on "
             "synthetic ASR + emotion: a CTC stage, a joint stage, an emotion-weighted stage, an utterance-summary stage; "
             "then score it on held-out data",
    )
    embedded.add_argument("--out", type=Path, default=Path("results/embedded"),
                          help="folder for the trained model and training.json (the packaged one lives in "
                               "speechtrim/weights/embedded)")
    embedded.add_argument("--ctc-steps", type=int, default=None, help="steps of the CTC stage (default: the recipe's, 1500)")
    embedded.add_argument("--ctc-dropout", type=float, default=None,
                          help="share of the encoder features zeroed at random in the CTC stage (default: the "
                               "recipe's, 0; in [0, 1))")
    embedded.add_argument("--joint-steps", type=int, default=None, help="steps of the joint stage (default: the recipe's, 450)")
    embedded.add_argument("--balance-steps", type=int, default=None,
                          help="steps of the emotion-weighted stage 3 (default: the recipe's, 100; 0: none)")
    embedded.add_argument("--summary-steps", type=int, default=None,
                          help="steps of stage 4, the utterance summary trained alone for emotion (default: the "
                               "recipe's, 60; 0: no summary)")
    embedded.add_argument("--init", type=Path, default=None,
                          help="start from a model saved by an earlier train-embedded run of this recipe without its "
                               "summary stage (e.g. speechtrim/weights/embedded) and run only the summary stage; "
                               "its history and stage times carry over into training.json")
    embedded.add_argument("--lr", type=float, default=None,
                          help="projector learning rate of the joint stage (default: the recipe's, 1e-4; warm-up then cosine)")
    embedded.add_argument("--batch-size", type=int, default=None, help="clips per joint-stage step (default 16)")
    embedded.add_argument("--lora-rank", type=int, default=None,
                          help="LoRA rank on the LLM's linear layers (default 8; 0 keeps the LLM frozen)")
    embedded.add_argument("--asr-sentences", type=int, default=None,
                          help="synthetic ASR training sentences (default: every usable fortune sentence)")
    embedded.add_argument("--wordnet-sentences", type=int, default=None,
                          help="WordNet example sentences rendered beside the fortunes (default 0: none)")
    embedded.add_argument("--neural-seeds", default=None,
                          help="comma-separated seeds, one more rendering of the fortune sentences each with about "
                               "half of its clips in the neural voices (Kokoro's five, piper's joe: pip install "
                               "'speechtrim[voices]'); default: none")
    embedded.add_argument("--asr-seeds", default=None,
                          help="comma-separated seeds, one rendering of the fortune sentences each (default 0,1)")
    embedded.add_argument("--pool", type=int, default=None, help="encoder frames per audio token (default 4)")
    embedded.add_argument("--ctc-pieces", type=int, default=None, metavar="N",
                          help="spell the CTC head's targets in LLM tokens of at most N characters (default: the "
                               "LLM's own tokenisation)")
    embedded.add_argument("--projector-context", type=int, default=None,
                          help="Transformer layers over the projector's outputs before its CTC head scores them "
                               "(default 0: the frame-wise MLP alone)")
    embedded.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                          help="the frozen encoder's and LLM's matrix products in training: bfloat16 (autocast) took "
                               "the recipe from 128 to 78-103 min on a 2-core AMX CPU (the packaged model: 78 min, with "
                               "--seed 1; slow without bfloat16 units); "
                               "weights, gradients and losses stay float32 (default: the recipe's, float32)")
    embedded.add_argument("--seed", type=int, default=0, help="seed of initialisation and shuffling")
    embedded.add_argument("--eval-limit", type=int, default=None, help="clips per held-out set (default: all)")
    embedded.add_argument("--eval-beams", type=int, default=None,
                          help="beams of the held-out evaluation's transcripts (default: the recipe's, 4; 1: greedy)")
    embedded.add_argument("--eval-ctc-weight", type=float, default=None,
                          help="weight of the CTC head in choosing among those beams (default: the recipe's, 0.5; "
                               "0: the LLM's best beam)")
    embedded.add_argument("--work", type=Path, default=None,
                          help="checkpoint folder; an interrupted run resumes from it (default: the cache)")
    embedded.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    embedded.set_defaults(run=_run_train_embedded)

    again = commands.add_parser(
        "evaluate-embedded",
        help="score a model saved by train-embedded (default: the packaged one) on the held-out sets again, with "
             "other decoding settings; --write records the scores in its training.json",
    )
    again.add_argument("--model", type=Path, default=None,
                       help="a folder written by train-embedded (default: speechtrim/weights/embedded)")
    again.add_argument("--beams", type=int, default=4,  # EmbeddedRecipe.eval_beams (a test keeps them equal)
                       help="beams of the transcripts (default 4, as train-embedded evaluates; 1: greedy)")
    again.add_argument("--ctc-weight", type=float, default=0.5,  # EmbeddedRecipe.eval_ctc_weight
                       help="weight of the CTC head in choosing among the beams (default 0.5, as train-embedded "
                            "evaluates; 0: the LLM's best beam)")
    again.add_argument("--limit", type=int, default=None, help="clips per held-out set (default: all)")
    again.add_argument("--write", action="store_true",
                       help="put the scores in the model's training.json (the scores they replace are kept under "
                            "'evaluations')")
    again.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    again.add_argument("--no-progress", action="store_true", help="hide progress bars")
    again.set_defaults(run=_run_evaluate_embedded)


def _add_bench(commands: Any) -> None:
    """``bench``: the accuracy-vs-cost sweep and the scaling study."""
    bench = commands.add_parser(
        "bench",
        help="accuracy vs cost of every token reducer x prefill-FLOPs reduction (tables, plot, resumable JSONL)",
    )
    bench.add_argument("--quick", action="store_true",
                       help="the small CPU preset: 4 + 4 ASR and 8 emotion clips, under 3 minutes on 2 cores "
                            "(default: 10 + 24 ASR and 48 emotion clips, ~15 minutes)")
    bench.add_argument("--data", default=None,
                       help="comma-separated sets: pocketsphinx, synthetic-asr, synthetic-emotion, or manifest paths "
                            "(default: the preset's)")
    bench.add_argument("--limit", type=int, default=None, help="clips per set (default: the preset's)")
    bench.add_argument("--methods", default=None,
                       help="comma-separated methods (default all): none, fastadasp (= fastadasp-sparse, "
                            "-constant, -decay) or one of them, and every registered reducer: "
                            f"{', '.join(_reducer_names())}")
    bench.add_argument("--targets", default=None,
                       help="target prefill-FLOPs reductions of every set, e.g. 0.1,0.3,0.5 (default: the preset's: "
                            "--quick 0.3,0.5 for ASR and 0.1,0.3 for emotion; the default 0.1-0.5)")
    bench.add_argument("--model", default="embedded",
                       help="embedded (default, offline), a saved SpeechLM folder, or a Hugging Face speech LLM id")
    bench.add_argument("--speechlm", type=Path, default=None, help="a saved SpeechLM folder (overrides --model)")
    bench.add_argument("--out", type=Path, default=None, help="output folder (default results/bench-<preset>)")
    bench.add_argument("--layer", default=None, help="first reduction layer or 'auto' (default: auto when stored)")
    bench.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per clip")
    bench.add_argument("--repeats", type=int, default=None, help="timed runs per clip (median)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--fresh", action="store_true", help="start over instead of resuming the results file")
    bench.add_argument("--scaling", action="store_true",
                       help="scaling study on 30-240 s audio instead of the sweep (FastAdaSP Tables 4, 5, 12, 13)")
    bench.add_argument("--scaling-lengths", default="30,60,120,240", help="audio lengths of --scaling, seconds")
    bench.add_argument("--memory-budget-gb", type=float, default=80.0, help="budget of the batch-size estimate")
    bench.add_argument("--batch-budget-gb", type=float, default=4.0,
                       help="--scaling: memory budget of the largest batch found by running it, each measurement in "
                            "a child process (0: measure no memory)")
    bench.add_argument("--batch-lengths", default=None,
                       help="--scaling: audio lengths whose largest batch is searched (default: the longest)")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's); 1 avoids thrashing when other jobs share the cores")
    bench.add_argument("--no-progress", action="store_true", help="hide progress bars")
    bench.add_argument("--engine", default="transformers", choices=("transformers", "vllm"),
                       help="where generation runs: transformers (every method) or vllm (pre-LLM methods, served "
                            "by a vLLM server from .venv-vllm)")
    bench.add_argument("--vllm-url", default=None,
                       help="with --engine vllm: a running server (e.g. http://127.0.0.1:8000) instead of starting one")
    bench.add_argument("--concurrency", type=int, default=16, help="with --engine vllm: requests in flight at once")
    bench.add_argument("--batch-size", type=int, default=None,
                       help="clips run together as one padded batch (default: the preset's, 8; 1: each clip alone, "
                            "for per-clip latency)")
    bench.add_argument("--beams", type=int, default=1,
                       help="beams of the transcripts scored (default 1: greedy; e.g. 4 with --ctc-weight 0.5, as "
                            "train-embedded evaluates). The timing columns stay those of the greedy pass")
    bench.add_argument("--ctc-weight", type=float, default=0.0,
                       help="with --beams: weight of the model's CTC head in choosing among the beams (default 0)")
    bench.set_defaults(run=_run_bench)


def _run_assets(args: argparse.Namespace) -> int:
    from speechtrim.assets.catalog import catalog

    known = {asset.name: asset for asset in catalog()}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; known: {sorted(known)}")
    chosen = [known[name] for name in args.names] if args.names else list(known.values())
    rows = []
    for asset in chosen:
        if args.action == "prepare":
            started = time.perf_counter()
            folder = asset.prepare()
            print(f"{asset.name}: ready in {folder} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
        rows.append(asset.status())
    headers = ["name", "kind", "installed", "prepared", "size_mb", "license", "path"]
    print(_markdown_table(headers, [[row[key] for key in headers] for row in rows]))
    print(json.dumps({"command": "assets", "action": args.action, "assets": rows}))
    return 0


def _run_transcribe(args: argparse.Namespace) -> int:
    from speechtrim.assets.whisper import load_whisper, transcribe
    from speechtrim.audio import duration_seconds, load_audio
    from speechtrim.eval.text import wer

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output is not None and args.output.is_dir():
        raise ValueError(f"--output {args.output} is a folder; pass a file name such as {args.output / 'hyps.jsonl'}")
    _apply_threads(args)
    if args.audio:
        clips = [(Path(path).stem, load_audio(path), None) for path in args.audio]
        data_name = "files"
    else:
        from speechtrim.data.realspeech import load_pocketsphinx_clips

        clips = [(utt.id, utt.load(), utt.text) for utt in load_pocketsphinx_clips()]
        data_name = "pocketsphinx-testdata (real read speech)"
    model, processor = load_whisper(args.model)
    started = time.perf_counter()
    hypotheses = transcribe(model, processor, [audio for _, audio, _ in clips], language=args.language, batch_size=args.batch_size,
                             progress=not args.no_progress)
    seconds = time.perf_counter() - started
    audio_seconds = sum(duration_seconds(audio) for _, audio, _ in clips)
    rows = []
    for (clip_id, audio, reference), hypothesis in zip(clips, hypotheses, strict=True):
        row = {"id": clip_id, "seconds": round(duration_seconds(audio), 2), "hypothesis": hypothesis}
        if reference is not None:
            row["reference"] = reference
            row["wer"] = round(wer([reference], [hypothesis]), 4)
        rows.append(row)
    headers = ["id", "seconds", "wer", "reference", "hypothesis"] if clips[0][2] is not None else ["id", "seconds", "hypothesis"]
    print(f"Whisper {args.model} on {data_name}: {len(clips)} clips, {audio_seconds:.1f} s of audio\n")
    print(_markdown_table(headers, [[row.get(key, "") for key in headers] for row in rows]))
    summary = {"command": "transcribe", "model": args.model, "data": data_name, "clips": len(clips),
               "audio_seconds": round(audio_seconds, 2), "rtf": round(seconds / audio_seconds, 4)}
    if clips[0][2] is not None:
        references = [reference for _, _, reference in clips]
        summary["wer"] = round(wer(references, hypotheses), 4)
        summary["normalizer"] = "whisper-english"
        print(f"\nWER {summary['wer']:.3f} (Whisper English normalisation of references and hypotheses)")
    print(f"real-time factor {summary['rtf']:.3f} on this machine ({seconds:.1f} s for {audio_seconds:.1f} s of audio)")
    if args.output is not None:  # after the table is printed: an output error never loses the transcripts
        from speechtrim.assets.cache import atomic_file

        with atomic_file(args.output) as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        summary["output"] = str(args.output)
    print(json.dumps(summary))
    return 0


def _apply_threads(args: argparse.Namespace) -> None:
    """``--threads`` (torch CPU threads) of the commands that have it."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)


def _run_adapters(args: argparse.Namespace) -> int:
    import dataclasses

    from speechtrim.adapters import names as adapter_names
    from speechtrim.train.compare import PRESETS, compare_adapters, load_dataset, markdown_tables, plot

    adapters = (args.adapter,) if args.command == "train" else tuple(a for a in args.adapters.split(",") if a)
    unknown = [a for a in adapters if a not in adapter_names()]
    if unknown or not adapters:
        raise ValueError(f"unknown adapter(s) {unknown or adapters}; choose from {adapter_names()}")
    preset = PRESETS[args.preset]
    overrides = {key: value for key, value in (("epochs", args.epochs), ("lr", args.lr),
                                                ("adapter_lr", args.adapter_lr), ("lr_schedule", args.lr_schedule))
                 if value is not None}
    config = dataclasses.replace(preset.train, seed=args.seed, **overrides)
    folds = args.folds if args.folds is not None else preset.folds
    dataset = load_dataset(args.data, preset)  # checks every row before any training
    from speechtrim.data.emotion import check_folds

    check_folds(dataset, folds)
    out = args.out or Path("results") / f"{args.command}-{dataset.name}-{args.preset}"
    summary = compare_adapters(dataset, out, adapters, folds, config, args.encoder, args.llm,
                               text_only=args.command == "compare-adapters", save=getattr(args, "save", None))
    summary["preset"] = args.preset
    chart = plot(summary, out / "adapters.png")
    tables = markdown_tables(summary)
    from speechtrim.assets.cache import atomic_file

    with atomic_file(out / "tables.md") as handle:
        handle.write(tables + "\n")
    print(tables)
    print(f"\nchart: {chart}; results: {out}")
    print(json.dumps({"command": args.command, **summary, "chart": str(chart)}, default=str))
    return 0


def _seeds(text: str | None, option: str) -> tuple[int, ...] | None:
    """A comma-separated list of integer seeds (None stays None, "" is none)."""
    if text is None:
        return None
    if not text.strip():
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated integers, e.g. 0,1; got {text!r}") from None


def _run_train_embedded(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex

    from speechtrim.train.embedded import EmbeddedRecipe, train_embedded

    _apply_threads(args)
    recipe = EmbeddedRecipe()
    ctc = dataclasses.replace(recipe.ctc, seed=args.seed,
                              **({"steps": args.ctc_steps} if args.ctc_steps is not None else {}),
                              **({"feature_dropout": args.ctc_dropout} if args.ctc_dropout is not None else {}))
    overrides = {key: value for key, value in (("steps", args.joint_steps), ("lr", args.lr),
                                                ("batch_size", args.batch_size)) if value is not None}
    joint = dataclasses.replace(recipe.joint, seed=args.seed, **overrides)
    fields = {key: value for key, value in (("asr_sentences", args.asr_sentences), ("pool", args.pool),
                                            ("wordnet_sentences", args.wordnet_sentences),
                                            ("asr_seeds", _seeds(args.asr_seeds, "--asr-seeds")),
                                            ("lora_rank", args.lora_rank),
                                            ("neural_seeds", _seeds(args.neural_seeds, "--neural-seeds")),
                                            ("projector_context", args.projector_context),
                                            ("ctc_max_piece", args.ctc_pieces),
                                            ("eval_beams", args.eval_beams),
                                            ("eval_ctc_weight", args.eval_ctc_weight),
                                            ("precision", args.precision)) if value is not None}
    if args.balance_steps is not None and args.balance_steps < 0:
        raise ValueError(f"--balance-steps must be >= 0 (0: no stage 3), got {args.balance_steps}")
    balance = None if args.balance_steps == 0 or recipe.balance is None else dataclasses.replace(
        recipe.balance, seed=args.seed, **({"steps": args.balance_steps} if args.balance_steps else {}))
    if args.summary_steps is not None and args.summary_steps < 0:
        raise ValueError(f"--summary-steps must be >= 0 (0: no summary stage), got {args.summary_steps}")
    summary = None if args.summary_steps == 0 or recipe.summary is None else dataclasses.replace(
        recipe.summary, seed=args.seed, **({"steps": args.summary_steps} if args.summary_steps else {}))
    if args.init is not None and summary is None:
        raise ValueError("--init runs only the summary stage: it cannot be combined with --summary-steps 0")
    if args.init is not None and not (args.init / "training.json").is_file():
        raise ValueError(f"--init {args.init}: no training.json there; give a folder written by train-embedded")
    recipe = dataclasses.replace(recipe, ctc=ctc, joint=joint, balance=balance, summary=summary,
                                 **({"summary_tokens": 0} if summary is None else {}), **fields)
    if recipe.neural_seeds:
        from speechtrim.data.synthetic_asr import require_neural_engines

        require_neural_engines()  # before the model loads
    command = "speechtrim " + " ".join(shlex.quote(part) for part in args.argv)
    report = train_embedded(recipe, args.out, args.work, command=command, eval_limit=args.eval_limit,
                            init=args.init)
    held_out = report["held_out"]
    print(f"held-out synthetic ASR WER {held_out['synthetic-asr']['wer']:.3f}, "
          f"pocketsphinx (real) WER {held_out['pocketsphinx']['wer']:.3f}, "
          f"synthetic emotion accuracy {held_out['synthetic-emotion']['accuracy']:.3f}; saved to {args.out}")
    print(json.dumps({"command": "train-embedded", "out": str(args.out),
                      **{key: report[key] for key in ("held_out", "history", "train_seconds")}}))
    return 0


def _run_evaluate_embedded(args: argparse.Namespace) -> int:
    import shlex

    from speechtrim.bench.runner import EMBEDDED_WEIGHTS
    from speechtrim.train.embedded import reevaluate

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    folder = args.model if args.model is not None else EMBEDDED_WEIGHTS
    _apply_threads(args)
    command = "speechtrim " + " ".join(shlex.quote(part) for part in args.argv)
    scores = reevaluate(folder, args.beams, args.ctc_weight, command=command, limit=args.limit,
                        progress=not args.no_progress, write=args.write)
    print(f"held-out synthetic ASR WER {scores['synthetic-asr']['wer']:.3f}, "
          f"pocketsphinx (real) WER {scores['pocketsphinx']['wer']:.3f}, "
          f"synthetic emotion accuracy {scores['synthetic-emotion']['accuracy']:.3f} ({args.beams} beams, CTC "
          f"weight {args.ctc_weight}){'; written to ' + str(folder) if args.write else ''}")
    print(json.dumps({"command": "evaluate-embedded", "model": str(folder), "num_beams": args.beams,
                      "ctc_weight": args.ctc_weight, "held_out": scores}))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from speechtrim.bench.main import BenchOptions, run_bench

    def numbers(text: str | None, option: str) -> tuple[float, ...] | None:
        if text is None:
            return None
        try:
            values = tuple(float(part) for part in text.split(",") if part.strip())
        except ValueError:
            values = ()
        if not values:
            example = "30,60,120" if option in ("--scaling-lengths", "--batch-lengths") else "0.1,0.3,0.5"
            raise ValueError(f"{option} takes comma-separated numbers such as {example}, got {text!r}")
        return values

    data = [part for part in args.data.split(",") if part] if args.data else None
    if data is not None and len(set(data)) != len(data):
        twice = sorted({name for name in data if data.count(name) > 1})
        raise ValueError(f"--data names {', '.join(twice)} more than once; name each set once")
    options = BenchOptions(
        preset="quick" if args.quick else "default",
        data=data, limit=args.limit,
        methods=[part for part in args.methods.split(",") if part] if args.methods else None,
        targets=numbers(args.targets, "--targets"), model=args.model, speechlm=args.speechlm, out=args.out,
        layer=args.layer, max_new_tokens=args.max_new_tokens, repeats=args.repeats, device=args.device,
        fresh=args.fresh, scaling=args.scaling, scaling_lengths=numbers(args.scaling_lengths, "--scaling-lengths"),
        memory_budget_gb=args.memory_budget_gb, batch_budget_gb=args.batch_budget_gb,
        batch_lengths=numbers(args.batch_lengths, "--batch-lengths") if args.batch_lengths else None,
        progress=not args.no_progress, threads=args.threads,
        engine=args.engine, vllm_url=args.vllm_url, concurrency=args.concurrency, batch_size=args.batch_size,
        beams=args.beams, ctc_weight=args.ctc_weight,
    )
    started = time.perf_counter()
    summary = run_bench(options)
    if args.scaling:
        print(Path(summary["table"]).read_text())
    else:
        print(Path(summary["tables"]).read_text())
        print(f"plot: {summary['plot']}; rows: {summary['jsonl']}" if "plot" in summary else f"rows: {summary['jsonl']}")
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps({"command": "bench", **summary}, default=str))
    if summary.get("failed_rows"):
        print(f"speechtrim bench: {summary['failed_rows']} row(s) failed; their errors are in {summary['jsonl']}",
              file=sys.stderr)
        return 1
    return 0


def _run_select_layer(args: argparse.Namespace) -> int:
    from speechtrim.layer_selection import select_layer
    from speechtrim.layer_store import selection_path
    from speechtrim.prompts import ASR_PROMPT, emotion_prompt

    if args.clips < 1:
        raise ValueError(f"--clips must be >= 1, got {args.clips}")
    if not 0.0 < args.ratio < 1.0:
        raise ValueError(f"--ratio must be in (0, 1), got {args.ratio}")
    from speechtrim import reducers

    if args.method not in reducers.names():
        raise ValueError(f"unknown --method {args.method!r}; choose from {reducers.names()}")
    layers = _parse_layers(args.layers) if args.layers else None
    _apply_threads(args)
    model = _embedded_speechlm(args.speechlm)
    if args.data == "pocketsphinx":
        from speechtrim.data.realspeech import load_pocketsphinx_clips

        clips = [(utt.load(), ASR_PROMPT) for utt in load_pocketsphinx_clips()[: args.clips]]
    else:
        from speechtrim.audio import load_audio
        from speechtrim.data.synthetic_emotion import load_synthetic_emotion

        dataset = load_synthetic_emotion()
        step = max(len(dataset) // args.clips, 1)
        chosen = dataset.examples[::step][: args.clips]
        clips = [(load_audio(e.audio_path), emotion_prompt(e.text, dataset.labels)) for e in chosen]
    from speechtrim.layer_store import check_overwrite

    calibration = {"data": args.data, "clips": len(clips)}
    check_overwrite(model.llm, calibration, layers, force=args.force)  # before the slow part
    batches = []
    for start in range(0, len(clips), 4):
        chunk = clips[start : start + 4]
        batch = model.prepare([audio for audio, _ in chunk], [prompt for _, prompt in chunk])
        batches.append({"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask,
                        "position_ids": batch.position_ids, "audio_spans": batch.audio_spans})
    best, entropies = select_layer(model.llm, batches, layers, args.method, args.ratio,
                                   progress=not args.no_progress, calibration=calibration)
    ranked = sorted(entropies, key=entropies.get)
    print(f"Transfer entropy of {args.method} (ratio {args.ratio}) per layer, {len(clips)} {args.data} clips:\n")
    print(_markdown_table(["rank", "layer", "transfer_entropy"],
                          [[rank + 1, layer, entropies[layer]] for rank, layer in enumerate(ranked)]))
    print(f"\nselected layer {best}; stored in {selection_path(model.llm)} for layer='auto'")
    print(json.dumps({"command": "select-layer", "method": args.method, "ratio": args.ratio, "data": args.data,
                      "selected_layer": best, "ranking": ranked,
                      "transfer_entropy": {str(k): round(v, 6) for k, v in entropies.items()}}))
    return 0


def _embedded_speechlm(folder: Path | None):
    from speechtrim.bench.runner import EMBEDDED_WEIGHTS
    from speechtrim.models.storage import CONFIG_FILE, build_speechlm, load_speechlm

    if folder is not None:
        return load_speechlm(folder)
    if (EMBEDDED_WEIGHTS / CONFIG_FILE).is_file():
        return load_speechlm(EMBEDDED_WEIGHTS)
    logger.warning("no trained SpeechLM given (--speechlm): using the packaged encoder and LLM with an untrained "
                   "projector; layer rankings are only meaningful for a trained one")
    return build_speechlm()


def _parse_layers(text: str) -> list[int]:
    layers: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            layers.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"--layers takes numbers and ranges such as 1-10 or 2,3,9, got {text!r}") from None
    return layers


def _markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
