"""Offline model assets: real weights that install from the package registries, converted once into a cache.

Public API:
    load_whisper(name) -> (WhisperForConditionalGeneration, WhisperProcessor)
    load_llm(name) -> (causal LM, tokenizer)
    catalog() -> list of the packaged assets, each with prepare() and cache_dir()
"""

from __future__ import annotations

from typing import Any

__all__ = ["catalog", "load_llm", "load_whisper", "prepare_llm", "prepare_whisper"]


def __getattr__(name: str) -> Any:
    # Lazy: importing speechtrim.assets must not import torch/transformers.
    if name in ("load_whisper", "prepare_whisper"):
        from speechtrim.assets import whisper

        return getattr(whisper, name)
    if name in ("load_llm", "prepare_llm"):
        from speechtrim.assets import llm

        return getattr(llm, name)
    if name == "catalog":
        from speechtrim.assets.catalog import catalog

        return catalog
    raise AttributeError(f"module 'speechtrim.assets' has no attribute {name!r}")
