"""Evaluation sets and task scores for the benchmark: ASR, emotion recognition and speech translation.

An :class:`EvalSet` is a list of clips of one task, each with its reference (transcript, label or translation) and
the instruction prompt the speech LLM gets. Sets come from the embedded data (the real pocketsphinx clips, the
synthetic ASR and emotion sets) or from any CSV / JSONL manifest. Every clip is loaded and checked when the set is
built, so a broken row fails before a sweep starts.

Scores: ASR word error rate with Whisper's English normalisation, emotion accuracy (WA),
unweighted accuracy (UA) and macro-F1, translation BLEU and chrF (sacrebleu); and **fidelity to the unreduced
model**, which needs no references: WER of the reduced output against the unreduced output (ASR, translation) or
label agreement (emotion).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechtrim.audio import duration_seconds, load_audio
from speechtrim.eval.metrics import agreement, classification_metrics
from speechtrim.eval.text import normalize_english, wer
from speechtrim.prompts import ASR_PROMPT, EMOTION_ANSWER_PREFIX, emotion_prompt

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Task:
    """How a task is scored: its primary metric and its fidelity to the unreduced outputs, each with a direction.

    Args:
        name: "asr", "emotion" or "translation".
        metric: the primary metric against the references ("wer", "accuracy", "bleu").
        higher_is_better: the metric's direction.
        fidelity: the score of reduced outputs against the unreduced ones ("wer_vs_full" or "agreement").
        fidelity_higher_is_better: its direction.
    """

    name: str
    metric: str
    higher_is_better: bool
    fidelity: str
    fidelity_higher_is_better: bool


TASK_RECORDS = {task.name: task for task in (
    Task("asr", "wer", False, "wer_vs_full", False),
    Task("emotion", "accuracy", True, "agreement", True),
    Task("translation", "bleu", True, "wer_vs_full", False),
)}
TASKS = tuple(TASK_RECORDS)
EMBEDDED_SETS = ("pocketsphinx", "synthetic-asr", "synthetic-emotion")
TRANSLATION_PROMPT = "Translate the audio into {language}.\n<audio>"


class EvalDataError(ValueError):
    """An evaluation set cannot be used; the message names the row or file and how to fix it."""


@dataclass
class EvalItem:
    """One clip to evaluate.

    Args:
        id: a name for the clip.
        audio: (T,) float32 mono samples at 16 kHz.
        reference: transcript (asr), label (emotion) or translation (translation).
        prompt: the user message, with one ``<audio>`` marker.
        assistant_prefix: text the assistant's answer starts with.
        synthetic: True when the audio is synthesised speech.
    """

    id: str
    audio: np.ndarray
    reference: str
    prompt: str
    assistant_prefix: str = ""
    synthetic: bool = False

    @property
    def seconds(self) -> float:
        """Length of the clip in seconds."""
        return duration_seconds(self.audio)


@dataclass
class EvalSet:
    """A named list of clips of one task (``labels`` are the emotion classes, in candidate order)."""

    name: str
    task: str
    items: list[EvalItem]
    labels: tuple[str, ...] = ()
    synthetic: bool = False
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def candidates(self) -> list[str] | None:
        """The answers scored for a label task (a space before each label, as the trainer does), else None."""
        return [" " + label for label in self.labels] if self.task == "emotion" else None

    def describe(self) -> str:
        """One line for tables: name, task, size, and whether it is synthetic."""
        kind = "SYNTHETIC" if self.synthetic else "real"
        return f"{self.name} ({self.task}, {len(self.items)} clips, {kind})"


def _spread(items: list, limit: int | None) -> list:
    """``limit`` items spread evenly over the list (all of them when limit is None or larger)."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"limit must be >= 1 clip, got {limit}")
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[int(index)] for index in picks]


def load_eval_set(spec: str, limit: int | None = None, target_language: str = "German") -> EvalSet:
    """Build an evaluation set from an embedded set name or a manifest path.

    Args:
        spec: "pocketsphinx" (10 real read-speech clips, ASR), "synthetic-asr", "synthetic-emotion", or a .csv /
            .jsonl manifest with an ``audio`` (or ``path``) column and one of ``transcript``/``text`` (ASR),
            ``label`` (emotion) or ``translation`` (translation); an optional ``task`` column picks among them.
        limit: use at most this many clips, spread over the set.
        target_language: language named in the translation prompt.
    """
    if spec == "pocketsphinx":
        from speechtrim.data.realspeech import load_pocketsphinx_clips

        chosen = _spread(load_pocketsphinx_clips(), limit)
        items = [EvalItem(u.id, u.load(), u.text, ASR_PROMPT) for u in chosen]
        return EvalSet("pocketsphinx", "asr", items)
    if spec == "synthetic-asr":
        from speechtrim.data.synthetic_asr import load_synthetic_asr

        chosen = _spread(load_synthetic_asr(), limit)
        items = [EvalItem(c.id, load_audio(c.audio_path), c.text, ASR_PROMPT, synthetic=True) for c in chosen]
        return EvalSet("synthetic-asr", "asr", items, synthetic=True)
    if spec == "synthetic-emotion":
        from speechtrim.data.synthetic_emotion import load_synthetic_emotion

        dataset = load_synthetic_emotion()
        chosen = _spread(dataset.examples, limit)
        items = [EvalItem(e.audio_path.stem, load_audio(e.audio_path), e.label,
                          emotion_prompt(e.text, dataset.labels), EMOTION_ANSWER_PREFIX, synthetic=True)
                 for e in chosen]
        return EvalSet("synthetic-emotion", "emotion", items, tuple(dataset.labels), synthetic=True)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        return load_manifest_set(path, limit, target_language)
    raise EvalDataError(f"unknown data {spec!r}; use one of {list(EMBEDDED_SETS)} or a .csv/.jsonl manifest path")


def _manifest_rows(path: Path) -> list[dict]:
    from speechtrim.data.manifest import read_manifest

    return read_manifest(path, EvalDataError)


def _row_task(row: dict, where: str) -> str:
    task = (row.get("task") or "").strip()
    if task:
        if task not in TASKS:
            raise EvalDataError(f"{where}: task {task!r} is not one of {list(TASKS)}")
        return task
    if row.get("label"):
        return "emotion"
    if row.get("translation"):
        return "translation"
    if row.get("transcript") or row.get("text"):
        return "asr"
    if any(column in row for column in ("transcript", "text", "label", "translation")):
        empty = [column for column in ("transcript", "text", "label", "translation") if column in row]
        raise EvalDataError(f"{where}: the {' / '.join(repr(c) for c in empty)} value is empty; fill it in or drop "
                            "the row")
    raise EvalDataError(f"{where}: needs a 'transcript' (or 'text'), 'label' or 'translation' column, "
                        f"got {sorted(row)}")


def warn_degenerate(samples: np.ndarray, where: str, sample_rate: int = 16000) -> list[str]:
    """Warn (and return the reasons) when a clip is unlikely to be usable speech: shorter than 0.1 s, silent, or
    clipped. Scores on such clips (a WER of 1000 % on 10 ms of audio) say nothing about the model."""
    problems = []
    if len(samples) < 0.1 * sample_rate:
        problems.append(f"only {1000 * len(samples) / sample_rate:.0f} ms long")
    peak = float(np.max(np.abs(samples))) if len(samples) else 0.0
    if peak < 1e-4:
        problems.append("silent (peak below 1e-4)")
    elif float(np.mean(np.abs(samples) >= 0.999)) > 0.01:
        problems.append("clipped (over 1 % of the samples at full scale)")
    if problems:
        logger.warning("%s: the clip is %s; its scores will not mean much", where, " and ".join(problems))
    return problems


def load_manifest_set(path: str | os.PathLike, limit: int | None = None, target_language: str = "German") -> EvalSet:
    """An evaluation set from a CSV (header row) or JSONL manifest; relative audio paths start at its folder.

    Args:
        path: the manifest.
        limit: use at most this many rows, spread over the file.
        target_language: language named in the translation prompt.
    """
    manifest = Path(path)
    rows = _manifest_rows(manifest)
    if not rows:
        raise EvalDataError(f"manifest {manifest} has no rows; add at least one clip")
    tasks = {_row_task(row, f"{manifest} row {number}") for number, row in enumerate(rows, start=1)}
    if len(tasks) != 1:
        raise EvalDataError(f"manifest {manifest} mixes tasks {sorted(tasks)}; write one manifest per task")
    task = tasks.pop()
    numbered = _spread(list(enumerate(rows, start=1)), limit)
    labels = sorted({str(row["label"]).strip() for row in rows}) if task == "emotion" else []
    if task == "emotion" and len(labels) < 2:
        raise EvalDataError(f"manifest {manifest}: every row has the label {labels[0]!r}; an emotion set needs at least "
                            "two labels (accuracy against one label is 100 % by construction)")
    items = []
    for number, row in numbered:
        where = f"{manifest} row {number}"
        audio = row.get("audio") or row.get("path")
        if not audio:
            raise EvalDataError(f"{where}: needs an 'audio' (or 'path') column, got {sorted(row)}")
        audio_path = Path(audio) if os.path.isabs(audio) else manifest.parent / audio
        if not audio_path.is_file():
            raise EvalDataError(f"{where}: audio file {audio_path} does not exist; fix the path or drop the row")
        samples = load_audio(audio_path)
        warn_degenerate(samples, where)
        clip_id = str(row.get("id") or audio_path.stem)
        if task == "asr":
            items.append(EvalItem(clip_id, samples, str(row.get("transcript") or row.get("text")), ASR_PROMPT))
        elif task == "emotion":
            prompt = emotion_prompt(row.get("transcript") or None, labels)
            items.append(EvalItem(clip_id, samples, str(row["label"]).strip(), prompt, EMOTION_ANSWER_PREFIX))
        else:
            language = row.get("target_language") or target_language
            items.append(EvalItem(clip_id, samples, str(row["translation"]),
                                  TRANSLATION_PROMPT.format(language=language)))
    synthetic = all(str(row.get("synthetic", "")).lower() in ("1", "true") for _, row in numbered)
    for item in items:
        item.synthetic = synthetic
    return EvalSet(manifest.stem, task, items, tuple(labels), synthetic=synthetic)


def task_scores(task: str, references: Sequence[str], outputs: Sequence[str]) -> dict[str, float]:
    """Every score of a task: asr {wer}, emotion {accuracy, ua, macro_f1}, translation {bleu, chrf}.

    Args:
        task: one of ``TASKS``.
        references: the reference per clip.
        outputs: the model's transcript, label or translation per clip.
    """
    if task == "asr":
        return {"wer": wer(list(references), list(outputs))}
    if task == "emotion":
        scores = classification_metrics(list(references), list(outputs))
        return {"accuracy": scores["wa"], "ua": scores["ua"], "macro_f1": scores["macro_f1"]}
    if task == "translation":
        import sacrebleu

        return {"bleu": float(sacrebleu.corpus_bleu(list(outputs), [list(references)]).score),
                "chrf": float(sacrebleu.corpus_chrf(list(outputs), [list(references)]).score)}
    raise ValueError(f"unknown task {task!r}; use one of {list(TASKS)}")


def score_interval(task: str, references: Sequence[str], outputs: Sequence[str], resamples: int = 1000,
                   seed: int = 0) -> tuple[float, float] | None:
    """95 % bootstrap interval over clips of the task's primary score (WER, accuracy or agreement with
    ``references``); None for translation (BLEU is not a ratio of per-clip counts) or fewer than two clips."""
    from speechtrim.eval.metrics import bootstrap_interval
    from speechtrim.eval.text import wer_counts

    if task == "asr":
        edits, words = wer_counts(list(references), list(outputs))
        return bootstrap_interval(edits, words, resamples, seed)
    if task == "emotion":
        wrong = [float(reference != output) for reference, output in zip(references, outputs)]
        interval = bootstrap_interval(wrong, [1.0] * len(wrong), resamples, seed)
        return None if interval is None else (1.0 - interval[1], 1.0 - interval[0])
    return None


def fidelity(task: str, full_outputs: Sequence[str], reduced_outputs: Sequence[str]) -> float | None:
    """How closely a reduced model follows the unreduced one (no references needed).

    Label tasks: agreement in [0, 1] (1 = identical). Text tasks: WER of the reduced output against the unreduced
    output (0 = identical); None when every unreduced output is empty after normalisation.

    Args:
        task: one of ``TASKS``.
        full_outputs: the unreduced model's output per clip.
        reduced_outputs: the reduced model's output per clip.
    """
    if task == "emotion":
        return agreement(list(full_outputs), list(reduced_outputs))
    if not any(normalize_english(text).split() for text in full_outputs):
        return None
    return wer(list(full_outputs), list(reduced_outputs))
