"""Length adapters (Bellver-Soler et al., IWSDS 2025): trainable modules that shorten projected audio embeddings.

Public API:
    names() -> list[str]
    build(name, dim=..., **params) -> LengthAdapter   # forward(x (B,T,D), mask (B,T) bool) -> (y, y_mask)
"""

from __future__ import annotations

from typing import Any

from speechtrim.adapters import attn_mean, attn_q_mean, concat, conv, mean, none  # noqa: F401  (registration)
from speechtrim.adapters.base import ADAPTERS, LengthAdapter

__all__ = ["LengthAdapter", "build", "names"]


def names() -> list[str]:
    """Every registered adapter name."""
    return ADAPTERS.names()


def build(name: str, dim: int | None = None, **params: Any) -> LengthAdapter:
    """Build the adapter registered as ``name`` for embeddings of width ``dim``.

    Args:
        name: one of ``names()``.
        dim: width of the embeddings the adapter receives (encoder or projector width); required.
        **params: the adapter's own options (e.g. ``factor`` for concat, ``stride`` for conv).
    """
    if name not in names():
        raise ValueError(f"unknown adapter {name!r}; choose one of {names()}")
    if dim is None:
        raise ValueError(f"adapters.build({name!r}) needs dim=, the width of the embeddings it receives (e.g. 576)")
    return ADAPTERS.build(name, dim=dim, **params)
