"""Find the text decoder inside any Hugging Face causal LM or composite speech LLM, and switch its attention backend.

Works for plain causal LMs (``LlamaForCausalLM``: ``model.model.layers``), composite speech LLMs
(``Qwen2AudioForConditionalGeneration``, Voxtral, Granite-Speech: ``model.model.language_model.layers`` in
transformers 5.x) and Qwen2.5-Omni (``model.thinker.model.language_model.layers``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import transformers
from packaging.version import Version
from torch import nn

from speechtrim.reduction import ModelShape

logger = logging.getLogger(__name__)

# transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to ``cache`` (the old name
# still works, with a warning, until 5.40). speechtrim passes the current name and reads either.
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24.0.dev0") else "past_key_values"


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder or decoder-layer forward was called with, under either name (None: no cache)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` from transformers 5.24, ``output.past_key_values`` before)."""
    cache = getattr(output, "cache", None) if CACHE_KWARG == "cache" else None
    return cache if cache is not None else output.past_key_values

# Attribute names that lead from a wrapper towards its text decoder, tried in this order.
_WRAPPER_ATTRIBUTES = ("thinker", "language_model", "text_model", "model", "decoder", "text_decoder")
_MAX_DEPTH = 6


@dataclass(frozen=True)
class TextBackbone:
    """The text decoder of a model and the sizes a reducer or a FLOPs counter needs.

    Args:
        decoder: the module that owns ``layers`` (e.g. ``LlamaModel``); its forward runs the decoder loop.
        layers: the decoder layers, in order.
        config: the text config the decoder reads (``decoder.config``).
        depth: number of decoder layers.
        hidden_size: model width D.
        intermediate_size: MLP width m.
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: width of one head.
    """

    decoder: nn.Module
    layers: nn.ModuleList
    config: object
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def shape(self) -> ModelShape:
        """The sizes a ratio plan or a FLOPs target depends on."""
        return ModelShape(self.depth, self.hidden_size, self.intermediate_size)

    @property
    def model_type(self) -> str:
        """The text config's ``model_type`` (e.g. "llama", "qwen2")."""
        return str(getattr(self.config, "model_type", "unknown"))


def _has_layer_list(module: object) -> bool:
    layers = getattr(module, "layers", None)
    return isinstance(layers, nn.ModuleList) and len(layers) > 0 and hasattr(layers[0], "self_attn")


def find_text_decoder(model: nn.Module) -> nn.Module:
    """Return the module that holds the text decoder's layer list (``.layers``) and runs the decoder loop.

    Args:
        model: a Hugging Face causal LM, a composite speech LLM, or the decoder itself.
    """
    frontier: list[nn.Module] = [model]
    seen: set[int] = set()
    for _ in range(_MAX_DEPTH):
        next_frontier: list[nn.Module] = []
        for module in frontier:
            if id(module) in seen:
                continue
            seen.add(id(module))
            if _has_layer_list(module):
                return module
            for name in _WRAPPER_ATTRIBUTES:
                child = getattr(module, name, None)
                if isinstance(child, nn.Module):
                    next_frontier.append(child)
            get_decoder = getattr(module, "get_decoder", None)
            if callable(get_decoder):
                try:
                    child = get_decoder()
                except (AttributeError, NotImplementedError, ValueError):
                    child = None
                if isinstance(child, nn.Module) and child is not module:
                    next_frontier.append(child)
        frontier = next_frontier
        if not frontier:
            break
    raise ValueError(
        f"could not find a text decoder with a `.layers` list of attention layers inside {type(model).__name__}; "
        "pass a Hugging Face causal LM or speech LLM (e.g. LlamaForCausalLM, Qwen2AudioForConditionalGeneration), "
        "or its text decoder module directly."
    )


def _mlp_width(config: Any) -> int:
    """The MLP width m of FastAdaSP's FLOPs count; a per-layer list (Gemma-3n) gives its mean."""
    width = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    if isinstance(width, (list, tuple)):
        return int(round(sum(int(w) for w in width) / len(width)))
    return int(width)


def text_backbone(model: nn.Module) -> TextBackbone:
    """Describe the text decoder of ``model``: its layers, depth and sizes.

    Args:
        model: a Hugging Face causal LM, a composite speech LLM, or the decoder itself.
    """
    decoder = find_text_decoder(model)
    config = getattr(decoder, "config", None)
    if config is None:
        raise ValueError(f"the text decoder {type(decoder).__name__} has no `.config`; pass a Hugging Face model.")
    layers = decoder.layers
    num_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    return TextBackbone(
        decoder=decoder,
        layers=layers,
        config=config,
        depth=len(layers),
        hidden_size=int(config.hidden_size),
        intermediate_size=_mlp_width(config),
        num_heads=num_heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
        head_dim=head_dim,
    )


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the text decoder of ``model`` uses now (e.g. "sdpa", "eager").

    Args:
        model: a Hugging Face causal LM, a composite speech LLM, or the decoder itself.
    """
    config = text_backbone(model).config
    return str(getattr(config, "_attn_implementation", None) or "eager")


def set_text_attn_implementation(model: nn.Module, name: str) -> str:
    """Switch only the text decoder's attention implementation; return the previous one so it can be restored.

    The audio encoder and any other sub-model keep theirs. Uses the public ``set_attn_implementation`` of the text
    decoder (a ``PreTrainedModel``), which updates the text config that its layers and mask builder read.

    Args:
        model: a Hugging Face causal LM, a composite speech LLM, or the decoder itself.
        name: a registered attention implementation ("sdpa", "eager", or a name registered with
            ``AttentionInterface.register``).
    """
    backbone = text_backbone(model)
    previous = str(getattr(backbone.config, "_attn_implementation", None) or "eager")
    if previous == name:
        return previous
    setter = getattr(backbone.decoder, "set_attn_implementation", None)
    if not callable(setter):
        raise ValueError(
            f"the text decoder {type(backbone.decoder).__name__} cannot switch its attention implementation; "
            "pass a Hugging Face PreTrainedModel."
        )
    setter(name)
    now = str(getattr(backbone.config, "_attn_implementation", None))
    if now != name:
        raise ValueError(
            f"could not switch {type(backbone.decoder).__name__} to attention implementation {name!r} (it is "
            f"{now!r}); the model family may not support custom attention backends."
        )
    logger.debug("text decoder attention: %s -> %s", previous, name)
    return previous
