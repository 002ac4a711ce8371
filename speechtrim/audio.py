"""Audio input: read a file or an array, check it, and return float32 mono at 16 kHz.

Every speechtrim model consumes 16 kHz mono float32 samples (Whisper's rate). ``load_audio`` reads anything
soundfile reads (WAV, FLAC, OGG, MP3 with libsndfile >= 1.1, AIFF, ...) and headerless raw PCM (``.raw``/``.pcm``),
down-mixes multi-channel audio by averaging, and resamples with a polyphase filter at the exact rational ratio.
Bad input fails early with an :class:`AudioError` that names the file and says how to fix it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
WINDOW_SECONDS = 30.0  # the Whisper encoder's input window
RAW_SUFFIXES = (".raw", ".pcm")
# dtype name -> (numpy little-endian dtype, scale that maps full range to [-1, 1), offset subtracted first)
RAW_DTYPES: dict[str, tuple[str, float, float]] = {
    "int16": ("<i2", 2.0**15, 0.0),
    "int32": ("<i4", 2.0**31, 0.0),
    "uint8": ("u1", 2.0**7, 128.0),
    "int8": ("i1", 2.0**7, 0.0),
    "float32": ("<f4", 1.0, 0.0),
    "float64": ("<f8", 1.0, 0.0),
}
# Leading bytes of the containers soundfile can read: a failing file that starts with one of these is corrupt,
# anything else is not audio soundfile understands (often a renamed text, video or archive file).
AUDIO_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"fLaC", b"OggS", b"FORM", b".snd", b"ID3", b"caff", b"NIST", b"riff")
SUPPORTED_HINT = "WAV, FLAC, OGG or MP3 (e.g. `ffmpeg -i input -ac 1 -ar 16000 output.wav`)"


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file (or "array input") and how to fix it."""


def _looks_like_audio(path: Path) -> bool:
    """Whether the file starts with the magic bytes of an audio container (or an MPEG audio frame sync)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:  # MPEG audio frame sync
        return True
    return head.startswith(AUDIO_MAGIC)


def _read_raw(path: Path, raw_sample_rate: int, raw_dtype: str) -> tuple[np.ndarray, int]:
    """Read headerless little-endian PCM; returns (samples (T,) float32, sample rate)."""
    if raw_dtype not in RAW_DTYPES:
        raise AudioError(
            f"{path}: unknown raw_dtype {raw_dtype!r}; pass one of {sorted(RAW_DTYPES)} (int16 is s16le PCM)"
        )
    numpy_dtype, scale, offset = RAW_DTYPES[raw_dtype]
    width = np.dtype(numpy_dtype).itemsize
    size = path.stat().st_size
    if size % width:
        raise AudioError(
            f"{path}: {size} bytes is not a multiple of the {width}-byte sample width of raw_dtype={raw_dtype!r}; "
            "the file is truncated or not raw PCM of that type: pass the right raw_dtype, or convert it to WAV"
        )
    samples = np.fromfile(path, dtype=numpy_dtype).astype(np.float64)  # (T,)
    if offset or scale != 1.0:
        samples = (samples - offset) / scale
    return samples, raw_sample_rate


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    """Read a file with soundfile; returns (samples (T,) or (T, C) float, sample rate)."""
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        if _looks_like_audio(path):
            raise AudioError(
                f"{path}: the audio file is corrupt or unreadable ({error}); re-export or re-download it, "
                f"or convert it to {SUPPORTED_HINT}"
            ) from None
        raise AudioError(
            f"{path}: unsupported or unrecognised audio format ({error}); the content is not audio that "
            f"soundfile reads (a renamed text or video file?): convert it to {SUPPORTED_HINT}"
        ) from None
    return samples, int(rate)


def _array_to_float(samples: np.ndarray, where: str) -> np.ndarray:
    """Convert integer PCM to float in [-1, 1) and floats to float64; refuse other dtypes."""
    if samples.dtype == np.bool_ or not (
        np.issubdtype(samples.dtype, np.integer) or np.issubdtype(samples.dtype, np.floating)
    ):
        raise AudioError(f"{where}: samples of dtype {samples.dtype} are not audio; pass float or integer PCM samples")
    if np.issubdtype(samples.dtype, np.integer):
        info = np.iinfo(samples.dtype)
        offset = (info.max + 1) / 2 if info.min == 0 else 0.0
        return (samples.astype(np.float64) - offset) / (float(info.max) + 1 - offset)
    return samples.astype(np.float64, copy=False)


def _to_mono(samples: np.ndarray, where: str, channels_last: bool) -> np.ndarray:
    """Average the channels: (T,) stays, (T, C) (or (C, T) for arrays) -> (T,)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise AudioError(f"{where}: expected 1-D (samples,) or 2-D audio, got shape {samples.shape}; pass mono samples")
    if channels_last:
        return samples.mean(axis=1)
    small = [axis for axis in (0, 1) if samples.shape[axis] <= 8]
    if len(small) != 1:
        raise AudioError(
            f"{where}: cannot tell the channel axis of shape {samples.shape}; pass a 1-D mono array, or "
            "(samples, channels) / (channels, samples) with at most 8 channels"
        )
    return samples.mean(axis=small[0])


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling at the exact rational ratio ``to_rate / from_rate``.

    Args:
        samples: (T,) mono samples.
        from_rate: their sample rate in Hz.
        to_rate: the wanted rate in Hz.

    Returns:
        (ceil(T * to_rate / from_rate),) samples, same dtype family (float).
    """
    if from_rate == to_rate:
        return samples
    common = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(samples, int(to_rate) // common, int(from_rate) // common)


def load_audio(
    source: str | os.PathLike | np.ndarray,
    sample_rate: int | None = None,
    *,
    raw_sample_rate: int = SAMPLE_RATE,
    raw_dtype: str = "int16",
) -> np.ndarray:
    """Load audio as float32 mono at 16 kHz, from a file or an array.

    Args:
        source: a path (anything soundfile reads, or ``.raw``/``.pcm`` headerless PCM) or a numpy array of samples,
            1-D, or 2-D with a channel axis of at most 8 channels (files give (samples, channels)).
        sample_rate: the rate of an array source (required then). For a file it is optional and, when given, must
            match the rate in its header (for raw PCM: ``raw_sample_rate``).
        raw_sample_rate: sample rate of raw PCM files.
        raw_dtype: sample type of raw PCM files, little-endian: int16 (s16le, default), int32, int8, uint8,
            float32 or float64.

    Returns:
        (T,) float32 samples at ``SAMPLE_RATE`` Hz.

    Raises:
        AudioError: missing, empty, corrupt or unsupported file; zero-length audio; NaN/inf samples; bad rate.
    """
    if isinstance(source, np.ndarray):
        where = "array input"
        if sample_rate is None:
            raise AudioError(f"{where}: an array has no sample rate; pass sample_rate=, e.g. load_audio(x, 16000)")
        if isinstance(sample_rate, bool) or float(sample_rate) != int(sample_rate):
            raise AudioError(f"{where}: sample_rate must be a whole number of Hz, got {sample_rate!r}")
        samples, rate, channels_last = _array_to_float(source, where), int(sample_rate), False
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        where = str(path)
        if not path.exists():
            raise AudioError(f"{path}: no such audio file; check the path (relative paths start at {Path.cwd()})")
        if not path.is_file():
            raise AudioError(f"{path}: is not a regular file; pass the path of an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{path}: the file is empty (0 bytes); re-export or re-download it")
        if path.suffix.lower() in RAW_SUFFIXES:
            if raw_sample_rate <= 0:
                raise AudioError(f"{path}: raw_sample_rate must be positive, got {raw_sample_rate}")
            samples, rate = _read_raw(path, int(raw_sample_rate), raw_dtype)
        else:
            samples, rate = _read_file(path)
            samples = samples.astype(np.float64)
        if sample_rate is not None and int(sample_rate) != rate:
            raise AudioError(
                f"{path}: sample_rate={sample_rate} was given but the file is {rate} Hz; drop sample_rate= "
                "(files carry their rate; for raw PCM pass raw_sample_rate=)"
            )
        channels_last = True
    else:
        raise AudioError(f"source must be a path or a numpy array, got {type(source).__name__}; pass one of those")
    if rate <= 0:
        raise AudioError(f"{where}: sample rate must be positive, got {rate}; pass the true rate in Hz")
    mono = _to_mono(samples, where, channels_last)  # (T,)
    if mono.size == 0:
        raise AudioError(f"{where}: the audio has zero samples; pass a recording with sound in it")
    bad = ~np.isfinite(mono)
    if bad.any():
        raise AudioError(
            f"{where}: {int(bad.sum())} of {mono.size} samples are NaN or inf; the audio is corrupt: re-export it "
            "(or clean the array, e.g. np.nan_to_num) before loading"
        )
    return resample(mono, rate, SAMPLE_RATE).astype(np.float32)  # (T * 16000 / rate,)


def split_windows(audio: np.ndarray, seconds: float = WINDOW_SECONDS,
                  sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
    """Split audio into consecutive windows of at most ``seconds``; concatenating them gives back every sample.

    Args:
        audio: (T,) mono samples.
        seconds: longest window, in seconds (Whisper's encoder takes 30 s).
        sample_rate: rate of ``audio`` in Hz.

    Returns:
        ceil(T / window) views of ``audio``, each (<= window,); the last one holds the remainder. Empty for T == 0.
    """
    if audio.ndim != 1:
        raise ValueError(f"split_windows wants 1-D mono audio, got shape {audio.shape}; load it with load_audio()")
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a positive number, got {seconds}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    window = int(math.floor(seconds * sample_rate + 1e-6))  # 0.7 * 16000 = 11199.999...: not one short
    if window < 1:
        raise ValueError(f"a {seconds} s window at {sample_rate} Hz holds no sample; pass a longer window")
    return [audio[start : start + window] for start in range(0, audio.shape[0], window)]


def duration_seconds(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Length of ``audio`` (T,) (or (T, C)) in seconds."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    return audio.shape[0] / float(sample_rate)
