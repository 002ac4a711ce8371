"""Encode many short clips cheaply: pack them into 30 s encoder windows, run the encoder once per window, and cut
each clip's frames back out.

The Whisper encoder always runs on a whole 30 s window, so a 3 s clip encoded alone pays for 30 s. Packed with a
second of silence between clips (starts aligned to the 20 ms frame grid), seven or eight clips share one pass. A
packed clip sees its neighbours through the encoder's attention, which encoding alone (as at inference) does not;
the gap keeps the two close. The frames land in an ``EncoderCache`` under their own id, never mixed with frames of
clips encoded alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from speechtrim.audio import SAMPLE_RATE, WINDOW_SECONDS, load_audio
from speechtrim.train.encoder_cache import EncoderCache, content_key

logger = logging.getLogger(__name__)

FRAME_SAMPLES = 320  # one Whisper encoder frame: 20 ms at 16 kHz
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)


def pack_windows(lengths: list[int], gap: int, window: int = WINDOW_SAMPLES) -> list[list[tuple[int, int]]]:
    """Greedy packing in order: windows of (clip index, start sample), each clip starting on the frame grid.

    Args:
        lengths: samples per clip (each at most ``window``).
        gap: silent samples between two clips.
        window: samples per window.
    """
    too_long = [i for i, length in enumerate(lengths) if length > window]
    if too_long:
        raise ValueError(f"clips {too_long[:5]} are longer than the {window / SAMPLE_RATE:.0f} s window; split them")
    windows: list[list[tuple[int, int]]] = []
    cursor = window + 1
    for index, length in enumerate(lengths):
        start = -(-cursor // FRAME_SAMPLES) * FRAME_SAMPLES  # round up to the frame grid
        if not windows or start + length > window:
            windows.append([])
            start = 0
        windows[-1].append((index, start))
        cursor = start + length + gap
    return windows


def encode_packed(model: torch.nn.Module, paths: list[Path], cache: EncoderCache, gap_seconds: float = 1.0,
                  batch_size: int = 4, progress: bool = True) -> list[torch.Tensor]:
    """Valid encoder frames (T_i, D) of each file, from packed windows; files already in ``cache`` are not encoded.

    Args:
        model: a SpeechLM (its feature extractor and encoder are used).
        paths: audio files (16 kHz mono after ``load_audio``), each at most 30 s.
        cache: where the frames are kept (give it an id of its own, e.g. "<encoder>-packed"); its ``precision`` is
            the encoder's here too.
        gap_seconds: silence between packed clips.
        batch_size: windows per encoder pass.
        progress: show a progress bar.
    """
    from speechtrim.models.speechlm import audio_frames

    keys = [content_key(path) for path in paths]
    todo = sorted({key: path for key, path in zip(keys, paths) if not cache.has(key)}.items())
    if todo:
        audios = [load_audio(path) for _, path in todo]
        windows = pack_windows([len(audio) for audio in audios], int(gap_seconds * SAMPLE_RATE))
        logger.info("encoding %d clips in %d packed windows", len(todo), len(windows))
        bar = tqdm(total=len(windows), desc="encoding packed windows", unit="window", disable=not progress)
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            signals = []
            for members in chunk:
                signal = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
                for index, start in members:
                    signal[start : start + len(audios[index])] = audios[index]
                signals.append(signal)
            features = model.feature_extractor(signals, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            hidden = model.encoder_frames(features.input_features, cache.precision)  # (b, 1500, D)
            for row, members in enumerate(chunk):
                for index, start in members:
                    offset = start // FRAME_SAMPLES
                    count = audio_frames(len(audios[index]), hidden.shape[1] - offset)
                    cache.put(todo[index][0], hidden[row, offset : offset + count])
            bar.update(len(chunk))
        bar.close()
    return [cache.load(key) for key in keys]


__all__ = ["encode_packed", "pack_windows"]
