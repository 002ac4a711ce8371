"""The real read-speech clips of Debian ``pocketsphinx-testdata``: 5 LibriVox utterances and 5 card-game commands.

The package installs ``/usr/share/pocketsphinx/test/data`` with ``librivox/`` (``fileids``, ``transcription``,
one ``<id>.wav`` each) and ``cards/`` (``cards.fileids``, ``cards.transcription``, ``<id>.wav``). Transcripts are
in Sphinx format, ``<s> text </s> (utterance-id)``; the markers and the id are stripped here. All clips are
16 kHz mono 16-bit WAV, 1-7 s long, public domain / BSD-2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechtrim.audio import load_audio
from speechtrim.data.clip import Clip

POCKETSPHINX_ROOT = Path("/usr/share/pocketsphinx/test/data")
ROOT_ENV = "SPEECHTRIM_POCKETSPHINX_DATA"
# subset -> (folder, fileids file, transcription file), relative to the root
SUBSETS = {
    "librivox": ("librivox", "fileids", "transcription"),
    "cards": ("cards", "cards.fileids", "cards.transcription"),
}
INSTALL_HINT = "sudo apt-get install pocketsphinx-testdata"
_SPHINX_LINE = re.compile(r"^\s*(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<id>[^()]+)\)\s*$")


def parse_sphinx_transcription(path: Path) -> dict[str, str]:
    """Read a Sphinx transcription file into {utterance id: text} (markers stripped, spaces collapsed).

    Args:
        path: a file of lines ``<s> text </s> (utterance-id)``.
    """
    transcripts: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        match = _SPHINX_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: not a Sphinx transcript line '<s> text </s> (id)': {line!r}")
        transcripts[match.group("id").strip()] = " ".join(match.group("text").split())
    return transcripts


def _default_root() -> Path:
    return Path(os.environ[ROOT_ENV]).expanduser() if os.environ.get(ROOT_ENV) else POCKETSPHINX_ROOT


def load_pocketsphinx_clips(
    root: str | os.PathLike | None = None, subsets: Sequence[str] = ("librivox", "cards")
) -> list[Clip]:
    """The real speech clips of pocketsphinx-testdata, in ``fileids`` order (10 with both subsets).

    Args:
        root: the package's data folder; default ``$SPEECHTRIM_POCKETSPHINX_DATA`` or
            /usr/share/pocketsphinx/test/data.
        subsets: which of "librivox" and "cards" to read.

    Raises:
        FileNotFoundError: the package (or a file of it) is missing; the message says how to install it.
        ValueError: an unknown subset name, or a fileid without a transcript.
    """
    if isinstance(subsets, str):
        subsets = (subsets,)
    unknown = [name for name in subsets if name not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown subset(s) {unknown}; pass some of {list(SUBSETS)}")
    base = Path(root).expanduser() if root is not None else _default_root()
    if not base.is_dir():
        raise FileNotFoundError(f"no pocketsphinx test data at {base}; install it with: {INSTALL_HINT} (or pass root=)")
    utterances = []
    for name in subsets:
        folder, fileids_name, transcription_name = SUBSETS[name]
        fileids, transcription = base / folder / fileids_name, base / folder / transcription_name
        for needed in (fileids, transcription):
            if not needed.is_file():
                raise FileNotFoundError(f"{needed} is missing; reinstall the package: {INSTALL_HINT}")
        transcripts = parse_sphinx_transcription(transcription)
        for utterance_id in fileids.read_text(encoding="utf-8").split():
            # a fileid may carry a folder (e.g. cards/001) or be bare; the transcript is keyed by its last part
            key = utterance_id.rsplit("/", 1)[-1]
            if key not in transcripts:
                raise ValueError(f"{fileids}: utterance {utterance_id!r} has no line in {transcription}")
            audio_path = base / folder / f"{key}.wav"
            if not audio_path.is_file():
                raise FileNotFoundError(f"{audio_path} is missing; reinstall the package: {INSTALL_HINT}")
            utterances.append(Clip(audio_path, text=transcripts[key], id=key, source=name))
    return utterances
