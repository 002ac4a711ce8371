"""The adapter comparison of Bellver-Soler et al. (2025): every length adapter plus the text-only baseline, k-fold.

Produces the paper's Table 1 (WA and macro-F1 per data set) and Table 2 (trainable parameters, speed-up against
``none``, acoustic tokens, mean WA and F1) as markdown, a PNG chart, and a JSON summary. Everything is resumable:
encoder outputs and transcripts are cached, each finished fold is kept.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechtrim.adapters import build as build_adapter
from speechtrim.assets.cache import atomic_file, write_json_atomic
from speechtrim.audio import load_audio
from speechtrim.data.emotion import Dataset, load_emodb, load_manifest, load_ravdess
from speechtrim.hf.prefix import PrefixCache
from speechtrim.train.encoder_cache import EncoderCache
from speechtrim.train.kfold import TEXT_ONLY, cross_validate, summarise
from speechtrim.train.trainer import TrainConfig

logger = logging.getLogger(__name__)
ADAPTER_ORDER = ("none", "mean", "concat", "conv", "attn_mean", "attn_q_mean")


@dataclass(frozen=True)
class Preset:
    """A named set of data and training sizes."""

    folds: int
    train: TrainConfig
    synthetic: dict[str, Any]
    description: str


PRESETS = {
    "quick": Preset(
        folds=2,
        train=TrainConfig(epochs=3, batch_size=4, grad_accum=1, lr=1e-2, adapter_lr=1e-5),
        synthetic={"voices_per_language": 2, "sentences_per_language": 2},
        description="CPU-sized: 96 synthetic clips, 2 folds, 3 epochs, lr 1e-2 (projector) and 1e-5 (adapter)",
    ),
    "paper": Preset(
        folds=5,
        train=TrainConfig(),
        synthetic={},
        description="the paper's Annex A: 5 folds, 20 epochs, batch 4 x accumulation 2, lr 1e-4 (GPU-sized)",
    ),
}


def load_dataset(spec: str, preset: Preset) -> Dataset:
    """``synthetic-emotion``, ``emodb:DIR``, ``ravdess:DIR`` or a manifest path (.csv / .jsonl)."""
    if spec == "synthetic-emotion":
        from speechtrim.data.synthetic_emotion import SyntheticEmotionRecipe, load_synthetic_emotion

        return load_synthetic_emotion(SyntheticEmotionRecipe(**preset.synthetic))
    kind, _, folder = spec.partition(":")
    if kind == "emodb" and folder:
        return load_emodb(folder)
    if kind == "ravdess" and folder:
        return load_ravdess(folder)
    if Path(spec).suffix.lower() in (".csv", ".jsonl", ".json"):
        return load_manifest(spec)
    raise ValueError(f"unknown data {spec!r}: use synthetic-emotion, emodb:DIR, ravdess:DIR or a .csv/.jsonl manifest")


def transcripts_for(dataset: Dataset, whisper_name: str, out_dir: Path,
                    frame_cache: EncoderCache | None = None) -> list[str]:
    """Whisper transcription of every clip (the prompt's "Transcription:"), cached in ``out_dir``.

    With ``frame_cache``, the encoder output of each transcribed clip is also stored there (valid frames only), so the
    encoder runs once per clip for both the transcript and the adapters' input.
    """
    from speechtrim.assets.whisper import load_whisper, transcribe

    path = out_dir / f"transcripts-{whisper_name}.json"
    cached: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    missing = [e for e in dataset.examples if e.key not in cached]
    if missing:
        model, processor = load_whisper(whisper_name)
        multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
        by_language: dict[str | None, list] = {}
        for example in missing:
            by_language.setdefault(example.language if multilingual else None, []).append(example)
        for language, examples in by_language.items():
            keep = None if frame_cache is None else functools.partial(_store_frames, frame_cache, examples)
            texts = transcribe(model, processor, [load_audio(e.audio_path) for e in examples], language=language,
                               max_new_tokens=64,  # short sentences; caps hallucination loops on synthetic voices
                               on_encoded=keep)
            cached.update({e.key: text for e, text in zip(examples, texts)})
            write_json_atomic(path, cached)
    return [cached[e.key] for e in dataset.examples]


def _store_frames(frame_cache: EncoderCache, examples: list, index: int, audio, hidden) -> None:
    """``transcribe``'s ``on_encoded``: keep the clip's valid encoder frames, as ``SpeechLM.encode`` would."""
    from speechtrim.models.speechlm import audio_frames

    frame_cache.store(examples[index].audio_path, hidden[: audio_frames(len(audio), hidden.shape[0])].float())


def compare_adapters(
    dataset: Dataset, out_dir: Path, adapters: tuple[str, ...] = ADAPTER_ORDER, folds: int = 5,
    config: TrainConfig = TrainConfig(), encoder: str = "base", llm: str = "smollm2-135m", progress: bool = True,
    text_only: bool = True, save: Path | None = None,
) -> dict[str, Any]:
    """Cross-validate the text-only baseline and each adapter on one data set; returns the summary rows.

    Args:
        dataset: labelled clips.
        out_dir: results folder (resumable).
        adapters: adapter names to train.
        folds: cross-validation folds.
        config: training settings.
        encoder: Whisper name (encoder and transcripts).
        llm: LLM name.
        progress: show progress bars.
        text_only: also score the text-only baseline.
        save: with one adapter, also train it on the whole data set and save it here (``load_speechlm`` reloads it).
    """
    from speechtrim.assets.whisper import whisper_cache_dir
    from speechtrim.models.storage import build_speechlm

    out_dir.mkdir(parents=True, exist_ok=True)
    base = build_speechlm(encoder, llm)
    base.system_prompt = ""  # the paper's prompt (Annex B) has no system turn; SmolLM2's template would add one
    encoder_id = whisper_cache_dir(encoder).name if "/" not in encoder else encoder.replace("/", "--")
    frame_cache = EncoderCache(base, encoder_id)
    transcripts = transcripts_for(dataset, encoder, out_dir, frame_cache)  # stores the encoder frames on the way
    frames = frame_cache.get([e.audio_path for e in dataset.examples], progress=progress)
    prefix_cache = PrefixCache(base.llm)  # the prompts' text before the audio, run once for every adapter and fold
    rows = []
    for name in ((TEXT_ONLY,) if text_only else ()) + tuple(adapters):
        logger.info("cross-validating %s", name)
        adapter = None if name == TEXT_ONLY else name
        results = cross_validate(base, dataset, frames, transcripts, adapter, out_dir / name, folds, config,
                                 progress=progress, prefix_cache=prefix_cache)
        row = {"adapter": name, **summarise(results), "folds": len(results)}
        width = base.llm.get_input_embeddings().embedding_dim
        projector = sum(p.numel() for p in base.projector.parameters())
        row["trainable_params"] = 0 if name == TEXT_ONLY else projector + build_adapter(name, dim=width).num_trainable
        rows.append(row)
    timings = time_inference(base, [row["adapter"] for row in rows], out_dir, frames, transcripts, dataset)
    for row in rows:
        row["seconds_per_clip"] = timings[row["adapter"]]
    reference = timings.get("none")
    for row in rows:
        row["speed_up"] = (1 - row["seconds_per_clip"] / reference) if reference else None
    summary = {"data": dataset.name, "synthetic": dataset.synthetic, "clips": len(dataset), "folds": folds,
               "labels": list(dataset.labels), "train": config.__dict__, "rows": rows}
    write_json_atomic(out_dir / "summary.json", summary)
    if save is not None:
        _train_and_save(base, dataset, frames, transcripts, adapters, config, save, progress)
    return summary


def _train_and_save(base, dataset: Dataset, frames, transcripts, adapters, config: TrainConfig, folder: Path,
                    progress: bool) -> None:
    from speechtrim.models.storage import save_trained
    from speechtrim.prompts import EMOTION_ANSWER_PREFIX, emotion_prompt
    from speechtrim.train.trainer import TrainItem, fit, seed_everything

    if len(adapters) != 1:
        raise ValueError(f"--save keeps one trained model: pass one adapter, got {list(adapters)}")
    seed_everything(config.seed)
    model = base.sharing(adapter=adapters[0])
    labels = list(dataset.labels)
    items = [TrainItem(f, emotion_prompt(t, labels), " " + e.label) for f, t, e in zip(frames, transcripts, dataset.examples)]
    fit(model, items, config, assistant_prefix=EMOTION_ANSWER_PREFIX, progress=progress)
    save_trained(model, folder, {"task": "emotion", "labels": labels, "data": dataset.name,
                                 "synthetic": dataset.synthetic})


def time_inference(base, names: list[str], out_dir: Path, frames, transcripts, dataset: Dataset, clips: int = 8,
                   repeats: int = 5) -> dict[str, float]:
    """Median seconds per clip to score the labels, per adapter (fold-0 weights), timed round-robin in one process.

    One warm-up round, then ``repeats`` rounds that visit every adapter in turn, so a noisy neighbour slows all of
    them alike; the speed-up of Table 2 is the ratio of these medians.
    """
    import statistics
    import time

    import torch

    from speechtrim.prompts import emotion_prompt
    from speechtrim.train.kfold import predict

    labels = list(dataset.labels)
    test = [(frames[i], emotion_prompt(transcripts[i], labels), dataset.examples[i].label)
            for i in range(min(clips, len(frames)))]
    models = {}
    for name in names:
        model = base.sharing(adapter="none" if name == TEXT_ONLY else name)
        weights = out_dir / name / "fold0.weights.pt"
        if weights.is_file():
            model.load_state_dict(torch.load(weights, weights_only=True), strict=False)
        models[name] = model
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats + 1):
        for name, model in models.items():
            started = time.perf_counter()
            predict(model, test, labels, text_only=name == TEXT_ONLY, batch_size=len(test), progress=False)
            if round_index > 0:  # round 0 is the warm-up
                samples[name].append((time.perf_counter() - started) / len(test))
    return {name: statistics.median(values) for name, values in samples.items()}


def markdown_tables(summary: dict[str, Any]) -> str:
    """The paper's Table 1 (WA, F1 per data set) and Table 2 (params, speed-up, tokens, WA, F1) as markdown."""
    name = summary["data"] + (" (SYNTHETIC)" if summary["synthetic"] else "")
    lines = [f"Table 1: {name}, {summary['clips']} clips, {summary['folds']}-fold CV (mean ± std over folds)", "",
             "| adapter | WA | macro-F1 | UA |", "|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['adapter']} | {row['wa']:.2f} ± {row['wa_std']:.2f} | "
                     f"{row['macro_f1']:.2f} ± {row['macro_f1_std']:.2f} | {row['ua']:.2f} ± {row['ua_std']:.2f} |")
    lines += ["", "Table 2: trainable parameters, inference speed-up against `none` (median seconds per clip to score "
              "the labels, timed round-robin in one process), acoustic tokens reaching the LLM",
              "", "| adapter | trainable params | speed-up | acoustic tokens | mean WA | mean macro-F1 |",
              "|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        speed = "-" if row["speed_up"] is None else f"{row['speed_up']:+.0%}"
        lines.append(f"| {row['adapter']} | {row['trainable_params'] / 1e6:.2f}M | {speed} | "
                     f"{row['audio_tokens']:.1f} | {row['wa']:.2f} | {row['macro_f1']:.2f} |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Bar chart of WA and macro-F1 per adapter, with the acoustic tokens written above each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    positions = range(len(rows))
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar([p - 0.2 for p in positions], [r["wa"] for r in rows], 0.4, yerr=[r["wa_std"] for r in rows], label="WA")
    axes.bar([p + 0.2 for p in positions], [r["macro_f1"] for r in rows], 0.4,
             yerr=[r["macro_f1_std"] for r in rows], label="macro-F1")
    for position, row in zip(positions, rows):
        axes.text(position, min(max(row["wa"], row["macro_f1"]) + 0.05, 1.02), f"{row['audio_tokens']:.0f} tok",
                  ha="center", fontsize=8)
    axes.set_xticks(list(positions), [r["adapter"] for r in rows])
    axes.set_ylim(0, 1.1)
    axes.set_ylabel("score")
    title = f"Length adapters on {summary['data']}" + (" (synthetic)" if summary["synthetic"] else "")
    axes.set_title(f"{title}, {summary['folds']}-fold CV")
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_file(path, mode="wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)
    return path
