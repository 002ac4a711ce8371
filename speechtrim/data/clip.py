"""The one record of an audio clip in a data set: its file and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechtrim.audio import load_audio


@dataclass
class Clip:
    """One audio file of a data set.

    Args:
        audio_path: the file.
        label: its class (emotion sets), or None.
        text: its transcript, or None.
        language: language code, or None.
        speaker: the speaker, or the synthetic voice, or None.
        synthetic: True when the audio is synthesised speech.
        meta: anything else (e.g. the prosody a synthetic emotion was rendered with).
        id: a short name (utterance id); "" when the file names it.
        source: the corpus or subset it comes from, or None.
    """

    audio_path: Path
    label: str | None = None
    text: str | None = None
    language: str | None = None
    speaker: str | None = None
    synthetic: bool = False
    meta: dict = field(default_factory=dict)
    id: str = ""
    source: str | None = None

    def load(self) -> np.ndarray:
        """The clip as (T,) float32 mono at 16 kHz."""
        return load_audio(self.audio_path)

    @property
    def key(self) -> str:
        """What identifies the clip: its file."""
        return str(self.audio_path)


__all__ = ["Clip"]
