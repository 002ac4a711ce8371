"""speechtrim.hf: the only package that touches transformers internals (decoder lookup, hooks, attention backend)."""

from speechtrim.hf.attach import Attachment
from speechtrim.hf.attention import BACKEND_NAME, AttentionTap, key_attention_scores, register_backend
from speechtrim.hf.layers import (
    TextBackbone,
    attn_implementation,
    find_text_decoder,
    set_text_attn_implementation,
    text_backbone,
)
from speechtrim.hf.spans import (
    audio_token_id,
    find_audio_spans,
    span_ids_from_input_ids,
    span_ids_from_spans,
    spans_from_span_ids,
)

__all__ = [
    "BACKEND_NAME",
    "Attachment",
    "AttentionTap",
    "TextBackbone",
    "attn_implementation",
    "audio_token_id",
    "find_audio_spans",
    "find_text_decoder",
    "key_attention_scores",
    "register_backend",
    "set_text_attn_implementation",
    "span_ids_from_input_ids",
    "span_ids_from_spans",
    "spans_from_span_ids",
    "text_backbone",
]
