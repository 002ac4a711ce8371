"""On-disk cache of frozen-encoder outputs, so a sweep over adapters encodes each clip once.

Keyed by the audio file's content (SHA-256) and the encoder's identity (its converted-weights folder name, which
carries the package version and checksum). Stored as float16 safetensors, valid frames only.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from speechtrim.assets.cache import atomic_file, cache_root
from speechtrim.audio import load_audio
from speechtrim.precision import cache_suffix

logger = logging.getLogger(__name__)


class EncoderCache:
    """Encoder frames per audio file: ``get(paths)`` returns a list of (T_i, D) float32 tensors.

    Args:
        model: a SpeechLM (its ``encode`` runs the frozen encoder).
        encoder_id: a string that changes whenever the encoder's weights change.
        folder: where to keep the files (default: the speechtrim cache).
        batch_size: clips encoded per forward pass.
        precision: the encoder's matrix products ("bfloat16": under autocast, ``compute_precision``); the id
            gets ``cache_suffix(precision)``, so frames of one precision never stand in for the other's.
    """

    def __init__(self, model: torch.nn.Module, encoder_id: str, folder: Path | None = None, batch_size: int = 8,
                 precision: str = "float32") -> None:
        if not encoder_id:
            raise ValueError("encoder_id must be a non-empty string that identifies the encoder's weights")
        encoder_id += cache_suffix(precision)
        self.precision = precision
        self.model = model
        self.folder = (folder or cache_root() / "encoder-frames") / encoder_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size

    def get(self, paths: list[Path], progress: bool = True) -> list[torch.Tensor]:
        """Frames of each file, encoding (and caching) the ones not seen before."""
        keys = [content_key(path) for path in paths]
        missing = sorted({key: path for key, path in zip(keys, paths) if not self._file(key).is_file()}.items())
        bar = tqdm(total=len(missing), desc="encoding audio (cached)", unit="clip", disable=not progress or not missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            frames, mask = self.model.encode([load_audio(path) for _, path in chunk], precision=self.precision)
            for row, (key, _) in enumerate(chunk):
                self._write(key, frames[row, mask[row]])
            bar.update(len(chunk))
        bar.close()
        return [self.load(key) for key in keys]

    def store(self, path: Path, frames: torch.Tensor) -> None:
        """Keep the valid frames (T, D) of ``path`` computed elsewhere (e.g. while transcribing the same clip)."""
        key = content_key(path)
        if not self._file(key).is_file():
            self._write(key, frames)

    def has(self, key: str) -> bool:
        """Whether frames for the content key ``key`` (``content_key(path)``) are stored."""
        return self._file(key).is_file()

    def put(self, key: str, frames: torch.Tensor) -> None:
        """Store the valid frames (T, D) under the content key ``key``."""
        self._write(key, frames)

    def load(self, key: str) -> torch.Tensor:
        """The stored frames (T, D) of ``key``, float32."""
        return load_file(self._file(key))["frames"].float()

    def _write(self, key: str, frames: torch.Tensor) -> None:
        with atomic_file(self._file(key), mode="wb") as handle:
            handle.write(_serialise(frames.detach().cpu().to(torch.float16)))

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"


def pad_frames(frames: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a list of (T_i, D) tensors into (B, T_max, D) with a (B, T_max) bool mask."""
    longest = max(f.shape[0] for f in frames)
    batch = torch.zeros(len(frames), longest, frames[0].shape[1])
    mask = torch.zeros(len(frames), longest, dtype=torch.bool)
    for row, tensor in enumerate(frames):
        batch[row, : len(tensor)] = tensor
        mask[row, : len(tensor)] = True
    return batch, mask


def content_key(path: Path) -> str:
    """The cache key of an audio file: the first 24 hex digits of its SHA-256."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digest[:24]


def _serialise(tensor: torch.Tensor) -> bytes:
    return save({"frames": tensor.contiguous()})


__all__ = ["EncoderCache", "content_key", "pad_frames"]
