"""Text decoder lookup and attention switching across model families."""

from __future__ import annotations

import pytest
from torch import nn

from speechtrim.hf.layers import attn_implementation, find_text_decoder, set_text_attn_implementation, text_backbone
from tests.tiny_models import tiny_llama, tiny_qwen2, tiny_qwen2_audio, tiny_voxtral


@pytest.mark.parametrize(
    "builder, decoder_name",
    [
        (tiny_llama, "LlamaModel"),
        (tiny_qwen2, "Qwen2Model"),
        (tiny_qwen2_audio, "Qwen2Model"),
        (tiny_voxtral, "LlamaModel"),
    ],
)
def test_text_backbone_is_found_with_its_sizes(builder, decoder_name):
    model = builder()
    backbone = text_backbone(model)
    assert type(backbone.decoder).__name__ == decoder_name
    assert (backbone.depth, backbone.hidden_size, backbone.intermediate_size) == (4, 64, 128)
    assert (backbone.num_heads, backbone.num_kv_heads, backbone.head_dim) == (4, 2, 16)
    assert find_text_decoder(backbone.decoder) is backbone.decoder  # the decoder itself is accepted


def test_switching_attention_touches_only_the_text_decoder_and_restores():
    model = tiny_voxtral()
    audio_before = model.config.audio_config._attn_implementation
    previous = set_text_attn_implementation(model, "eager")
    assert previous == "sdpa" and attn_implementation(model) == "eager"
    assert model.config.audio_config._attn_implementation == audio_before
    assert set_text_attn_implementation(model, previous) == "eager"
    assert attn_implementation(model) == "sdpa"


def test_modules_without_a_decoder_are_refused():
    with pytest.raises(ValueError, match="text decoder"):
        text_backbone(nn.Linear(2, 2))
