"""Training-free audio-token reducers that attach to an unmodified Hugging Face model (FastAdaSP and baselines).

Public API::

    from speechtrim import reducers
    reducers.names()
    reducer = reducers.build("fastadasp", ratio=0.3, layer=3, schedule="constant")
    with reducer(model, audio_spans=None) as stats:
        model.generate(**inputs)
    stats.tokens_per_layer
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from speechtrim.reducers.base import REDUCERS, ReductionStats, Reducer

# Every module of this package is a method that registers itself: adding one is adding its file.
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REDUCERS", "Reducer", "ReductionStats", "build", "names"]


def names() -> list[str]:
    """Every registered reducer name."""
    return REDUCERS.names()


def build(name: str, **params: Any) -> Reducer:
    """Build the reducer registered as ``name``.

    Args:
        name: one of ``names()``.
        **params: ``ratio`` or ``flops_reduction``, ``layer``, ``schedule``, ``seed`` (see :class:`Reducer`).
    """
    return REDUCERS.build(name, **params)
