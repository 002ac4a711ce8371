"""What an :class:`~speechtrim.hf.attach.Attachment` refuses, with errors that say how to fix the call.

Reducers need consistent arguments, full causal attention through SDPA or eager (or speechtrim's tapping backend),
a DynamicCache (reduced layers keep different numbers of tokens), the 2-D padding mask, and plans that only touch
audio tokens. Model families outside the tested ones get one warning each.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from speechtrim.hf.attention import BACKEND_NAME
from speechtrim.hf.layers import TextBackbone
from speechtrim.hf.positions import POSITION_MODES
from speechtrim.ops.plan import Plan

logger = logging.getLogger(__name__)

SUPPORTED_ATTENTION = ("sdpa", "eager", BACKEND_NAME)
TESTED_FAMILIES = ("llama", "qwen2", "qwen2_audio", "voxtral", "granite_speech", "qwen2_5_omni_thinker")
_warned_families: set[str] = set()


def check_method(method: object) -> None:
    """Refuse a method the attachment cannot run: an unknown ``acts_on``, compact positions with a cache evictor,
    or a pre-LLM method that is not at layer 0.

    Args:
        method: the reducer (its ``name``, ``acts_on``, ``positions``).
    """
    name, acts_on = getattr(method, "name", type(method).__name__), getattr(method, "acts_on", None)
    if acts_on not in ("hidden", "cache", "embeddings"):
        raise ValueError(f"{name}: acts_on must be 'hidden', 'cache' or 'embeddings', got {acts_on!r}")
    positions = getattr(method, "positions", "original")
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if positions == "compact" and acts_on == "cache":
        raise ValueError(
            f"positions='compact' re-numbers the tokens a hidden-state plan keeps, but KV-cache evictors (like "
            f"{name}) keep the evicted cache's rotary keys as they are and do not renumber: use "
            "positions='original' with them."
        )


def check_text_decoder(backbone: TextBackbone) -> None:
    """Refuse attention implementations the hooks cannot serve and decoders with non-full attention layers.

    Args:
        backbone: the text decoder the attachment hooks.
    """
    config = backbone.config
    implementation = str(getattr(config, "_attn_implementation", None) or "eager")
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported by speechtrim reducers; call "
            "model.set_attn_implementation('sdpa') (or load with attn_implementation='sdpa') first."
        )
    if getattr(config, "altup_num_inputs", None) or getattr(config, "num_kv_shared_layers", 0):
        raise ValueError(
            f"{getattr(config, 'model_type', 'this model')} (Gemma-3n style) is not supported by speechtrim reducers: "
            "its decoder carries 4-D AltUp hidden states (altup, batch, tokens, width) and later layers reuse "
            "earlier layers' KV caches, which the reducers' per-layer gathers and evictions do not follow yet. Use "
            "a pre-LLM method, or another tested family (speechtrim.hf.checks.TESTED_FAMILIES)."
        )
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(
            f"the text decoder has non-full attention layers ({sorted(set(layer_types))}); speechtrim reducers "
            "support full causal attention only: disable sliding windows in the config."
        )


def warn_untested_family(model: nn.Module, backbone: TextBackbone) -> None:
    """Warn once per model family that is not among :data:`TESTED_FAMILIES`.

    Args:
        model: the wrapped model (its config's ``model_type`` names the family).
        backbone: its text decoder (a tested text ``model_type`` is enough).
    """
    family = str(getattr(getattr(model, "config", backbone.config), "model_type", "unknown"))
    if family in TESTED_FAMILIES or backbone.model_type in TESTED_FAMILIES or family in _warned_families:
        return
    _warned_families.add(family)
    logger.warning(
        "model family %r is untested with speechtrim reducers (tested: %s); check the outputs.",
        family,
        ", ".join(TESTED_FAMILIES),
    )


def check_decoder_inputs(cache: object, mask: object) -> None:
    """Refuse caches other than DynamicCache and attention masks other than the 2-D (B, T) padding mask.

    Args:
        cache: the decoder's KV cache (None = no cache).
        mask: the decoder's ``attention_mask`` (None = no padding).
    """
    from transformers.cache_utils import DynamicCache

    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"{type(cache).__name__} is not supported while a reducer is attached: reduced layers keep "
            "different numbers of tokens, which only a DynamicCache can hold; use DynamicCache() (the default "
            "of generate()) instead of a static cache."
        )
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError(
            "a reducer needs the 2-D (B, T) padding attention mask (or None); got "
            f"{type(mask).__name__} {getattr(mask, 'shape', '')}: pass the tokenizer's attention_mask."
        )


def check_plan(plan: Plan, layer_idx: int, span_id: torch.Tensor, caller: str = "method") -> None:
    """Refuse plans of the wrong shape, and plans that evict or merge tokens outside audio spans.

    Args:
        plan: the plan ``caller`` returned.
        layer_idx: the decoder layer it was built for.
        span_id: (B, T) long, the layer's span ids (-1 outside audio spans).
        caller: what made the plan ("method" or "cache eviction"), for the error message.
    """
    batch, length = span_id.shape
    if plan.batch != batch or plan.old_length != length or plan.source.shape[0] != batch:
        raise ValueError(
            f"{caller} returned a plan for ({plan.batch}, {plan.old_length}) tokens at layer {layer_idx}, but the "
            f"layer sees ({batch}, {length}); build the plan from the span_id (B, T) passed to {caller}."
        )
    text = span_id < 0  # (B, T)
    own_index = torch.arange(length, device=span_id.device).expand(batch, length)
    kept_alone = (plan.slot >= 0) & (plan.source.gather(1, plan.slot.clamp(min=0)) == own_index)
    if bool((text & ~kept_alone).any()):
        raise ValueError(
            f"the {caller} plan at layer {layer_idx} evicts or merges tokens outside audio spans (span_id == -1); "
            "reducers may only touch audio tokens: restrict the plan to span_id >= 0."
        )
