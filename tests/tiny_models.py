"""Tiny random Hugging Face models built in code (seeded), for offline CPU tests of the attach plumbing."""

from __future__ import annotations

import torch

VOCAB = 128
AUDIO_TOKEN = 100  # placeholder id used by the tiny speech LLMs and by text-only tests
PAD_TOKEN = 0
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD_TOKEN,
    bos_token_id=1,
    eos_token_id=2,
)


def _finish(model: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_llama(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A 4-layer LlamaForCausalLM (hidden 64, 4 heads / 2 KV heads) with seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(LlamaConfig(**_TEXT)), attn_implementation)


def tiny_qwen2(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A 4-layer Qwen2ForCausalLM (hidden 64, 4 heads / 2 KV heads, qkv bias) with seeded random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(Qwen2Config(**_TEXT)), attn_implementation)


def tiny_qwen2_audio(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A Qwen2AudioForConditionalGeneration with a 2-layer, 32-wide audio encoder and the tiny Qwen2 text model."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2Config,
    )

    torch.manual_seed(seed)
    audio = Qwen2AudioEncoderConfig(
        num_mel_bins=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        max_source_positions=64,
    )
    config = Qwen2AudioConfig(audio_config=audio, text_config=Qwen2Config(**_TEXT), audio_token_index=AUDIO_TOKEN)
    return _finish(Qwen2AudioForConditionalGeneration(config), attn_implementation)


def tiny_voxtral(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A VoxtralForConditionalGeneration with a 2-layer audio encoder and a tiny Llama text model."""
    from transformers import LlamaConfig, VoxtralConfig, VoxtralEncoderConfig, VoxtralForConditionalGeneration

    torch.manual_seed(seed)
    audio = VoxtralEncoderConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_mel_bins=16,
        max_source_positions=64,
    )
    config = VoxtralConfig(audio_config=audio, text_config=LlamaConfig(**_TEXT), audio_token_id=AUDIO_TOKEN)
    return _finish(VoxtralForConditionalGeneration(config), attn_implementation)


def audio_prompt(audio_lengths: list[int], text_before: int = 3, text_after: int = 4, seed: int = 0) -> dict:
    """Left-padded token prompts ``[text][audio x n][text]`` with audio placeholders, one row per audio length.

    Returns ``input_ids`` (B, T) and ``attention_mask`` (B, T), both long.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in audio_lengths:
        before = torch.randint(3, AUDIO_TOKEN, (text_before,), generator=generator)
        after = torch.randint(3, AUDIO_TOKEN, (text_after,), generator=generator)
        rows.append(torch.cat([before, torch.full((length,), AUDIO_TOKEN), after]))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = row
        attention_mask[index, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
