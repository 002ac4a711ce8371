"""Labelled speech data sets for emotion recognition: manifests (CSV / JSONL) and EmoDB / RAVDESS folders.

Every loader checks the whole set before any training starts: a missing or unreadable file, an unknown label or an
empty set raises a ``DatasetError`` that names the row and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from speechtrim.data.clip import Clip

PAPER_EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad")

# EmoDB: the 6th character of a file name is the emotion letter (German initials).
EMODB_LETTERS = {"W": "angry", "L": "boredom", "E": "disgust", "A": "fear", "F": "happy", "T": "sad", "N": "neutral"}
# RAVDESS: modality-channel-emotion-intensity-statement-repetition-actor.wav; emotion is the 3rd field.
RAVDESS_CODES = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fear",
                 "07": "disgust", "08": "surprised"}


class DatasetError(ValueError):
    """A data set cannot be used; the message names the row or file and how to fix it."""


@dataclass
class Dataset:
    """A named list of examples and its label set."""

    name: str
    examples: list[Clip]
    labels: tuple[str, ...]
    synthetic: bool = False

    def __len__(self) -> int:
        return len(self.examples)


def load_manifest(path: str | os.PathLike, labels: Sequence[str] | None = None, check_audio: bool = True) -> Dataset:
    """Read a CSV (header row) or JSONL manifest: ``audio`` (or ``path``), ``label``; optional ``transcript``,
    ``language``, ``speaker``. Relative audio paths are resolved against the manifest's folder.

    Args:
        path: the manifest file.
        labels: the allowed labels (default: those present).
        check_audio: open every audio file now, so a broken row fails before training.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise DatasetError(f"manifest {manifest} does not exist")
    from speechtrim.data.manifest import read_manifest

    rows = read_manifest(manifest, DatasetError)
    examples = []
    for number, row in enumerate(rows, start=1):
        where = f"{manifest} row {number}"
        audio = row.get("audio") or row.get("path")
        if not audio or not row.get("label"):
            raise DatasetError(f"{where}: needs an 'audio' (or 'path') and a 'label' column, got {sorted(row)}")
        audio_path = Path(audio) if os.path.isabs(audio) else manifest.parent / audio
        examples.append(
            Clip(audio_path, str(row["label"]).strip(), row.get("transcript") or None, row.get("language") or None,
                    row.get("speaker") or None, meta={"row": number})
        )
    return _checked(Dataset(manifest.stem, examples, tuple(labels or ())), check_audio, source=str(manifest))


def load_emodb(root: str | os.PathLike, labels: Sequence[str] | None = PAPER_EMOTIONS, check_audio: bool = True) -> Dataset:
    """Berlin EmoDB: ``wav/03a01Fa.wav`` -> speaker 03, emotion letter F (happy). Labels outside ``labels`` are skipped."""
    files = _wav_files(root, "EmoDB")
    examples = []
    for file in files:
        letter = file.stem[5:6]
        if letter not in EMODB_LETTERS:
            raise DatasetError(f"EmoDB file {file}: 6th character {letter!r} is not an emotion letter {sorted(EMODB_LETTERS)}")
        label = EMODB_LETTERS[letter]
        if labels is None or label in labels:
            examples.append(Clip(file, label, language="de", speaker=file.stem[:2]))
    return _checked(Dataset("emodb", examples, tuple(labels or ())), check_audio, source=str(root))


def load_ravdess(root: str | os.PathLike, labels: Sequence[str] | None = PAPER_EMOTIONS, check_audio: bool = True) -> Dataset:
    """RAVDESS speech: ``03-01-05-01-02-01-12.wav`` -> emotion 05 (angry), actor 12. Other labels are skipped."""
    files = _wav_files(root, "RAVDESS")
    examples = []
    for file in files:
        fields = file.stem.split("-")
        if len(fields) != 7 or fields[2] not in RAVDESS_CODES:
            raise DatasetError(f"RAVDESS file {file}: expected 7 dash-separated fields with an emotion code 01-08")
        label = RAVDESS_CODES[fields[2]]
        if labels is None or label in labels:
            examples.append(Clip(file, label, language="en", speaker=fields[6]))
    return _checked(Dataset("ravdess", examples, tuple(labels or ())), check_audio, source=str(root))


def check_folds(dataset: Dataset, folds: int) -> None:
    """Refuse a fold count that some class cannot fill (stratified k-fold needs >= k examples per class)."""
    if folds < 2:
        raise DatasetError(f"folds must be >= 2, got {folds}")
    counts = {label: sum(e.label == label for e in dataset.examples) for label in dataset.labels}
    short = {label: count for label, count in counts.items() if count < folds}
    if short:
        raise DatasetError(
            f"{dataset.name}: classes with fewer examples than folds={folds}: {short}; lower --folds or add examples"
        )


def _wav_files(root: str | os.PathLike, corpus: str) -> list[Path]:
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetError(f"{corpus} folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".wav")


def _checked(dataset: Dataset, check_audio: bool, source: str) -> Dataset:
    if not dataset.examples:
        raise DatasetError(f"data set {dataset.name} ({source}) has no usable examples")
    present = sorted({e.label for e in dataset.examples})
    if dataset.labels:
        for example in dataset.examples:
            if example.label not in dataset.labels:
                raise DatasetError(
                    f"{_where(example)}: unknown label {example.label!r}; allowed: {list(dataset.labels)}"
                )
    else:
        dataset.labels = tuple(present)
    if check_audio:
        import soundfile

        for example in dataset.examples:
            if not example.audio_path.is_file():
                raise DatasetError(f"{_where(example)}: audio file {example.audio_path} does not exist")
            try:
                soundfile.info(str(example.audio_path))
            except Exception as error:  # soundfile raises its own error types and RuntimeError
                raise DatasetError(f"{_where(example)}: audio file {example.audio_path} is unreadable ({error})") from None
    return dataset


def _where(example: Clip) -> str:
    return f"row {example.meta['row']} ({example.audio_path.name})" if "row" in example.meta else str(example.audio_path)
