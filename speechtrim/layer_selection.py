"""Transfer-entropy layer selection for the sparse strategy (FastAdaSP section 3.4, eqs. 7-8, appendix A.4).

The entropy of a feature F (tokens x channels) under a per-channel Gaussian model is, up to a constant,
H(F) = sum_c log sigma(F^c) (eq. 7). TE_i = |H(F_final) - H(F_final | reduction at layer i)| (eq. 8): how much the
final layer's attention output changes in entropy when the reducer runs at layer i. The layer with the smallest
TE loses the least information. Results are saved per model so that ``layer="auto"`` can use them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from speechtrim.layer_store import save_selection

logger = logging.getLogger(__name__)


def gaussian_entropy(features: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 7 per row: sum over channels of log std over the row's valid tokens.

    Args:
        features: (B, T, D) features.
        valid: (B, T) bool, tokens that count (default: all).
    Returns:
        (B,) entropies (natural log, constants dropped).
    """
    if valid is None:
        valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    weights = valid.to(features.dtype).unsqueeze(-1)  # (B, T, 1)
    count = weights.sum(dim=1).clamp(min=2)  # (B, 1)
    mean = (features * weights).sum(dim=1) / count  # (B, D)
    variance = (((features - mean.unsqueeze(1)) ** 2) * weights).sum(dim=1) / (count - 1)  # (B, D)
    return 0.5 * torch.log(variance.clamp(min=1e-12)).sum(dim=-1)  # (B,)


def transfer_entropy(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    layers: Sequence[int] | None = None,
    method: str = "fastadasp",
    ratio: float = 0.5,
    progress: bool = True,
) -> dict[int, float]:
    """TE_i of each candidate layer, averaged over calibration rows (eq. 8).

    Args:
        model: a Hugging Face causal LM or speech LLM.
        batches: model keyword arguments per calibration batch; a batch may carry ``audio_spans`` (and
            ``audio_token_id``), which go to the reducer instead of the model.
        layers: candidate layers (default: 1 .. depth-1).
        method: the reducer whose operation Phi is measured.
        ratio: its merge ratio during calibration.
        progress: show a progress bar.
    """
    from speechtrim import reducers
    from speechtrim.hf.layers import text_backbone

    backbone = text_backbone(model)
    candidates = list(layers) if layers is not None else list(range(1, backbone.depth))
    bad = [layer for layer in candidates if not 1 <= layer < backbone.depth]
    if bad or not candidates:
        raise ValueError(f"candidate layers must lie in 1..{backbone.depth - 1}, got {candidates}")
    totals = {layer: 0.0 for layer in candidates}
    rows = 0
    batches = list(batches)
    if not batches:
        raise ValueError("transfer_entropy needs at least one calibration batch")
    bar = tqdm(total=len(batches) * (len(candidates) + 1), desc="transfer entropy", unit="pass", disable=not progress)
    for batch in batches:
        kwargs = {key: value for key, value in batch.items() if key not in ("audio_spans", "audio_token_id")}
        base = _final_attention_entropy(model, backbone, kwargs)  # (B,)
        bar.update(1)
        for layer in candidates:
            reducer = reducers.build(method, ratio=ratio, layer=layer)
            with reducer(model, batch.get("audio_spans"), batch.get("audio_token_id")):
                reduced = _final_attention_entropy(model, backbone, kwargs)
            totals[layer] += float((base - reduced).abs().sum())
            bar.update(1)
        rows += int(base.shape[0])
    bar.close()
    return {layer: total / rows for layer, total in totals.items()}


def _final_attention_entropy(model: nn.Module, backbone: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """Eq. 7 of the last decoder layer's attention output (the reduced sequence when a reducer is attached)."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple, output: Any) -> None:
        captured["features"] = (output[0] if isinstance(output, tuple) else output).detach().float()

    last = backbone.layers[-1]
    handle = last.self_attn.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(**kwargs, use_cache=False)
    finally:
        handle.remove()
    features = captured["features"]  # (B, T_final, D)
    # Padding sits on the left and reducers only shrink audio; the last `valid` positions of each row are real.
    mask = kwargs.get("attention_mask")
    if mask is None:
        return gaussian_entropy(features)
    padding = (mask == 0).sum(dim=1)  # (B,) original left padding
    removed = mask.shape[1] - features.shape[1]  # same for all rows at the final layer's padded width
    positions = torch.arange(features.shape[1], device=features.device).unsqueeze(0)
    valid = positions >= (padding - removed).clamp(min=0).unsqueeze(1)
    return gaussian_entropy(features, valid)


def select_layer(
    model: nn.Module, batches: Iterable[dict[str, Any]], layers: Sequence[int] | None = None,
    method: str = "fastadasp", ratio: float = 0.5, progress: bool = True, calibration: dict | None = None,
) -> tuple[int, dict[int, float]]:
    """Compute TE for each candidate layer, store the ranking for ``layer="auto"``, return (best layer, TE)."""
    entropies = transfer_entropy(model, batches, layers, method, ratio, progress)
    save_selection(model, entropies, method, ratio, calibration)
    best = min(entropies, key=lambda layer: entropies[layer])
    logger.info("transfer entropy selects layer %d of %s", best, sorted(entropies))
    return best, entropies
