"""Stratified k-fold cross-validation of a length adapter for emotion recognition (Bellver-Soler et al. 2025, sec. 4).

Folds are speaker-independent when every example names its speaker (StratifiedGroupKFold), plain stratified
otherwise. Each finished fold is written to ``<out>/fold<k>.json`` (atomically) and skipped when the run starts
again; an interrupted fold resumes from its per-epoch checkpoint. The text-only baseline scores the same candidate
labels with the frozen LLM from the transcription alone.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from tqdm.auto import tqdm

from speechtrim.assets.cache import write_json_atomic
from speechtrim.data.emotion import Dataset, check_folds
from speechtrim.eval.metrics import classification_metrics, mean_std
from speechtrim.hf.prefix import PrefixCache
from speechtrim.models.speechlm import SpeechLM
from speechtrim.prompts import EMOTION_ANSWER_PREFIX, emotion_prompt
from speechtrim.train.encoder_cache import pad_frames
from speechtrim.train.trainer import TrainConfig, TrainItem, fit, seed_everything, trainable_state

logger = logging.getLogger(__name__)
TEXT_ONLY = "text_only"  # the row label of the text-only baseline in comparison tables


@dataclass
class FoldResult:
    """Scores of one fold."""

    fold: int
    wa: float
    ua: float
    macro_f1: float
    audio_tokens: float  # mean acoustic tokens reaching the LLM per clip
    seconds_per_clip: float  # median inference time per clip (scoring all candidates; cached prompt start), this machine
    train_seconds: float
    final_loss: float | None
    test_size: int


def fold_splits(dataset: Dataset, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test index arrays of each fold (speaker-independent when speakers are known)."""
    check_folds(dataset, folds)
    labels = np.array([e.label for e in dataset.examples])
    speakers = [e.speaker for e in dataset.examples]
    indices = np.arange(len(labels))
    if all(speakers) and len(set(speakers)) >= folds:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(indices, labels, groups=np.array(speakers)))
    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(indices, labels))


def cross_validate(
    base: SpeechLM,
    dataset: Dataset,
    frames: list[torch.Tensor],
    transcripts: list[str],
    adapter: str | None,
    out_dir: Path,
    folds: int = 5,
    config: TrainConfig = TrainConfig(),
    adapter_params: dict[str, Any] | None = None,
    progress: bool = True,
    prefix_cache: PrefixCache | None = None,
) -> list[FoldResult]:
    """Train and test ``adapter`` on every fold, or score the text-only baseline (no audio) when it is None.

    Args:
        base: a SpeechLM whose frozen encoder and LLM are shared by every fold's fresh projector + adapter.
        dataset: the labelled clips.
        frames: cached encoder frames of each clip, (T_i, D_enc).
        transcripts: Whisper transcription of each clip (the prompt's "Transcription:").
        adapter: a length adapter name, or None for the text-only baseline.
        out_dir: where fold results and checkpoints go (resumable).
        folds: number of folds.
        config: training settings.
        adapter_params: adapter options.
        progress: show progress bars.
        prefix_cache: the frozen LLM's keys and values of the prompts' text before the audio, shared by every fold
            (a fresh one when None); the timing of Table 2 does not use one.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix_cache = PrefixCache(base.llm) if prefix_cache is None else prefix_cache
    labels = list(dataset.labels)
    prompts = [emotion_prompt(text, labels) for text in transcripts]
    results = []
    for fold, (train_index, test_index) in enumerate(fold_splits(dataset, folds, config.seed)):
        done = out_dir / f"fold{fold}.json"
        if done.is_file():
            results.append(FoldResult(**json.loads(done.read_text())))
            continue
        seed_everything(config.seed + fold)
        model = base.sharing(adapter=adapter or "none",
                             adapter_params=dict(adapter_params or {}))
        started = time.perf_counter()
        history: list[dict[str, float]] = []
        if adapter is not None:
            items = [TrainItem(frames[i], prompts[i], " " + dataset.examples[i].label) for i in train_index]
            history = fit(model, items, config, checkpoint=out_dir / f"fold{fold}.ckpt",
                          assistant_prefix=EMOTION_ANSWER_PREFIX, progress=progress, prefix_cache=prefix_cache)
        train_seconds = time.perf_counter() - started
        test = [(frames[i], prompts[i], dataset.examples[i].label) for i in test_index]
        predictions, tokens, seconds = predict(model, test, labels, text_only=adapter is None, progress=progress,
                                               prefix_cache=prefix_cache)
        scores = classification_metrics([label for _, _, label in test], predictions)
        result = FoldResult(fold, scores["wa"], scores["ua"], scores["macro_f1"], tokens, seconds, train_seconds,
                            history[-1]["loss"] if history else None, len(test))
        write_json_atomic(done, asdict(result))
        if adapter is not None:
            torch.save(trainable_state(model), out_dir / f"fold{fold}.weights.pt")
            (out_dir / f"fold{fold}.ckpt").unlink(missing_ok=True)
        results.append(result)
        logger.info("%s fold %d: WA %.3f F1 %.3f", adapter or TEXT_ONLY, fold, result.wa, result.macro_f1)
    return results


@torch.no_grad()
def predict(
    model: SpeechLM, test: list[tuple[torch.Tensor, str, str]], labels: list[str], text_only: bool = False,
    batch_size: int = 8, progress: bool = True, prefix_cache: PrefixCache | None = None,
) -> tuple[list[str], float, float]:
    """Predicted label per clip (highest log-probability candidate), mean audio tokens, median seconds per clip.

    With ``prefix_cache`` the prompt text before the audio is read from it (same scores, less work; the seconds
    then leave that text out).
    """
    model.eval()
    candidates = [" " + label for label in labels]
    predictions: list[str] = []
    tokens: list[int] = []
    per_clip: list[float] = []
    for start in tqdm(range(0, len(test), batch_size), desc="scoring", unit="batch", disable=not progress, leave=False):
        chunk = test[start : start + batch_size]
        started = time.perf_counter()
        frames, mask = pad_frames([item[0] for item in chunk])
        embeds, embeds_mask = model.embed_audio(frames.to(model.device), mask.to(model.device))
        if text_only:
            embeds_mask = torch.zeros_like(embeds_mask)
        batch = model.build_inputs([item[1] for item in chunk], embeds, embeds_mask,
                                   assistant_prefix=EMOTION_ANSWER_PREFIX, prefix_cache=prefix_cache)
        scores = model.score(batch, candidates)  # (b, C)
        per_clip.append((time.perf_counter() - started) / len(chunk))
        predictions += [labels[i] for i in scores.argmax(dim=1).tolist()]
        tokens += embeds_mask.sum(dim=1).tolist()
    return predictions, float(np.mean(tokens)), statistics.median(per_clip)


def summarise(results: list[FoldResult]) -> dict[str, float]:
    """Mean and std over folds of WA, UA and macro-F1, and the means of tokens and time."""
    summary: dict[str, float] = {}
    for metric in ("wa", "ua", "macro_f1"):
        summary[metric], summary[f"{metric}_std"] = mean_std([getattr(r, metric) for r in results])
    summary["audio_tokens"] = float(np.mean([r.audio_tokens for r in results]))
    summary["seconds_per_clip"] = float(np.median([r.seconds_per_clip for r in results]))
    summary["train_seconds"] = float(sum(r.train_seconds for r in results))
    return summary
