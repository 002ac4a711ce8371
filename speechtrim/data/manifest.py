"""One reader for clip manifests: a CSV file with a header row, or JSONL with one JSON object per line.

Every problem is reported with the file, the row and the fix, before any audio is read: a file that is not UTF-8,
a CSV row with more fields than the header, a JSONL line that is not valid JSON or not an object, a path column
that is not a string.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

PATH_COLUMNS = ("audio", "path")


class ManifestError(ValueError):
    """A manifest that cannot be read as clip rows; the message names the file, the row and the fix."""


def read_manifest(path: Path, error: type[ValueError] = ManifestError) -> list[dict]:
    """The rows of a .csv or .jsonl (.json) manifest as dicts, in file order.

    Args:
        path: the manifest.
        error: the ValueError subclass to raise (callers keep their own error types).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"manifest {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise error(f"manifest {path}: use a .csv (with a header row) or .jsonl file, got {suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as problem:
        raise error(f"manifest {path} is not UTF-8 text (byte {problem.start}); save it as UTF-8") from None
    rows = _csv_rows(path, text, error) if suffix == ".csv" else _jsonl_rows(path, text, error)
    for number, row in enumerate(rows, start=1):
        for column in PATH_COLUMNS:
            if column in row and row[column] is not None and not isinstance(row[column], str):
                raise error(f"{path} row {number}: {column!r} must be a file path (a string), got "
                            f"{type(row[column]).__name__} {row[column]!r}")
    return rows


def _csv_rows(path: Path, text: str, error: type[ValueError]) -> list[dict]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for number, row in enumerate(reader, start=1):
        if None in row:  # DictReader puts the fields past the header under None
            raise error(f"{path} row {number}: {len(reader.fieldnames or []) + len(row[None])} fields but the "
                        f"header has {len(reader.fieldnames or [])}; quote fields that contain commas")
        rows.append(row)
    return rows


def _jsonl_rows(path: Path, text: str, error: type[ValueError]) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as problem:
            raise error(f"{path} line {number}: not valid JSON ({problem.msg}); fix that line") from None
        if not isinstance(row, dict):
            raise error(f"{path} line {number}: each line must be a JSON object such as "
                        f'{{"audio": "clip.wav", "transcript": "..."}}, got {type(row).__name__}')
        rows.append(row)
    return rows


__all__ = ["ManifestError", "read_manifest"]
