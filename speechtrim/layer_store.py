"""Where the transfer-entropy layer selection of a model is stored, and how ``layer="auto"`` reads it.

Kept apart from :mod:`speechtrim.layer_selection` (which runs reducers to measure transfer entropy) so that a
reducer resolving ``layer="auto"`` imports nothing that imports the reducers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from speechtrim.assets.cache import cache_root, write_json_atomic


def model_key(model: nn.Module) -> str:
    """A stable identity of a model's weights (all of them: a LoRA merged into the LLM changes it), for storing its
    layer selection."""
    from speechtrim.fingerprint import module_fingerprint
    from speechtrim.hf.layers import text_backbone

    backbone = text_backbone(model)
    config = getattr(model, "config", backbone.config)
    return hashlib.sha256(f"{getattr(config, 'model_type', '')}|{module_fingerprint(model)}".encode()).hexdigest()[:16]


def selection_path(model: nn.Module) -> Path:
    """Where the layer selection of ``model`` is stored."""
    return cache_root() / "layer-selection" / f"{model_key(model)}.json"


def save_selection(model: nn.Module, entropies: dict[int, float], method: str, ratio: float,
                   calibration: dict | None = None) -> Path:
    """Store a TE ranking so that ``layer="auto"`` picks its best layer; returns the file.

    Args:
        model: the decoder the ranking is for.
        entropies: transfer entropy per candidate layer.
        method, ratio: the reducer operation measured.
        calibration: what it was measured on (e.g. {"data": "pocketsphinx", "clips": 8}), recorded in the file.
    """
    ranked = sorted(entropies, key=lambda layer: entropies[layer])
    path = selection_path(model)
    write_json_atomic(path, {"selected_layer": ranked[0], "ranking": ranked, "method": method, "ratio": ratio,
                             "calibration": calibration or {}, "candidates": sorted(entropies),
                             "transfer_entropy": {str(layer): value for layer, value in entropies.items()}})
    return path


def check_overwrite(model: nn.Module, calibration: dict, layers: Sequence[int] | None, force: bool = False) -> None:
    """Refuse (ValueError) to replace a stored selection calibrated on more clips or more candidate layers than the
    new one would be, unless ``force``: every later ``layer="auto"`` would otherwise use the weaker ranking."""
    path = selection_path(model)
    if force or not path.is_file():
        return
    stored = json.loads(path.read_text())
    stored_clips = int(stored.get("calibration", {}).get("clips", 0))
    stored_layers = len(stored.get("candidates", stored.get("ranking", [])))
    new_layers = len(layers) if layers is not None else text_backbone_depth(model) - 1
    if stored_clips > calibration.get("clips", 0) or stored_layers > new_layers:
        raise ValueError(f"{path} holds a selection calibrated on {stored_clips} clips and {stored_layers} candidate "
                         f"layers; this run has {calibration.get('clips', 0)} clips and {new_layers} layers. Pass "
                         "--force to replace it, or calibrate on at least as much")


def text_backbone_depth(model: nn.Module) -> int:
    """Decoder layers of ``model``'s text backbone."""
    from speechtrim.hf.layers import text_backbone

    return text_backbone(model).depth


def selected_layer(model: nn.Module) -> int:
    """The layer chosen by transfer entropy for ``model`` (``layer="auto"``)."""
    path = selection_path(model)
    if not path.is_file():
        raise ValueError(
            "layer='auto' needs a transfer-entropy selection for this model and none is stored; run "
            "`speechtrim select-layer` (or speechtrim.layer_selection.select_layer) first, or pass layer=N"
        )
    return int(json.loads(path.read_text())["selected_layer"])


__all__ = ["check_overwrite", "model_key", "save_selection", "selected_layer", "selection_path"]
