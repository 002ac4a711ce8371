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
    layer selection.

    The LLM of a :class:`~speechtrim.models.speechlm.SpeechLM` is keyed together with the SpeechLM's audio path
    (encoder, projector, length adapter): the same LLM fed by another projector sees other audio tokens, and a
    selection measured on one must not be reused for the other.
    """
    from speechtrim.fingerprint import module_fingerprint
    from speechtrim.hf.layers import text_backbone

    backbone = text_backbone(model)
    config = getattr(model, "config", backbone.config)
    parts = [str(getattr(config, "model_type", "")), module_fingerprint(model)]
    frontend_ref = getattr(model, "speechtrim_frontend", None)
    frontend = frontend_ref() if frontend_ref is not None else None
    if frontend is not None:
        parts += [f"{name}={module_fingerprint(child)}" for name, child in frontend.named_children()
                  if name != "llm"]
        parts.append(f"pool={frontend.pool}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def selection_path(model: nn.Module) -> Path:
    """Where a layer selection of ``model`` made on this machine is stored (the user cache)."""
    return cache_root() / "layer-selection" / f"{model_key(model)}.json"


def packaged_selection_paths() -> list[Path]:
    """Selections shipped with the package, each recording the ``model_key`` it was measured for."""
    return sorted((Path(__file__).resolve().parent / "weights").glob("*/layer-selection.json"))


def find_selection(model: nn.Module) -> Path | None:
    """The stored selection ``layer="auto"`` uses for ``model``: one made on this machine, else a packaged one
    whose recorded model key matches (the embedded default ships its own), else None."""
    path = selection_path(model)
    if path.is_file():
        return path
    key = path.stem
    for packaged in packaged_selection_paths():
        if json.loads(packaged.read_text()).get("model_key") == key:
            return packaged
    return None


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
    write_json_atomic(path, {"model_key": path.stem, "selected_layer": ranked[0], "ranking": ranked,
                             "method": method, "ratio": ratio, "calibration": calibration or {},
                             "candidates": sorted(entropies),
                             "transfer_entropy": {str(layer): value for layer, value in entropies.items()}})
    return path


def check_overwrite(model: nn.Module, calibration: dict, layers: Sequence[int] | None, force: bool = False) -> None:
    """Refuse (ValueError) to replace a stored selection calibrated on more clips or more candidate layers than the
    new one would be, unless ``force``: every later ``layer="auto"`` would otherwise use the weaker ranking."""
    path = find_selection(model)
    if force or path is None:
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


def stored_selection(model: nn.Module, required: bool = True) -> tuple[int, Path] | None:
    """The layer chosen by transfer entropy for ``model`` and the file it comes from. When none is stored:
    ValueError saying how to make one, or None if not ``required``."""
    path = find_selection(model)
    if path is None:
        if not required:
            return None
        raise ValueError(
            "layer='auto' needs a transfer-entropy selection for this model and none is stored; run "
            "`speechtrim select-layer` (or speechtrim.layer_selection.select_layer) first, or pass layer=N"
        )
    return int(json.loads(path.read_text())["selected_layer"]), path


def selected_layer(model: nn.Module) -> int:
    """The layer chosen by transfer entropy for ``model`` (``layer="auto"``)."""
    return stored_selection(model)[0]


__all__ = ["check_overwrite", "find_selection", "model_key", "packaged_selection_paths", "save_selection",
           "selected_layer", "selection_path", "stored_selection"]
