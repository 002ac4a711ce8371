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


# ---------------------------------------------------------------- more native speech LLM families
# What each tiny family supports (checked in transformers 5.23, CPU):
# - granite_speech: batch > 1 with left padding and a different number of audio tokens per row. The projector turns
#   every GRANITE_WINDOW frames into GRANITE_WINDOW // GRANITE_DOWNSAMPLE tokens; ``input_features_mask`` (B, N) picks
#   the first ``n`` projected tokens of each row, as GraniteSpeechProcessor does.
# - qwen2_5_omni_thinker: batch > 1 with left padding and a different number of audio tokens per row. The audio
#   tower packs the valid frames of all rows (``feature_attention_mask`` (B, F)); ``4 * n`` frames give ``n`` tokens.
#   Audio-only prompts get M-RoPE position ids (3, B, T) whose three rows are equal (get_rope_index's text path);
#   the decoder layers receive (B, T) text positions or None and (B, T, d) rotary tables.
MEL_BINS = 16
GRANITE_WINDOW = 4
GRANITE_DOWNSAMPLE = 2
OMNI_FRAMES_PER_TOKEN = 4
_OMNI_SPECIAL = dict(
    audio_start_token_id=101,
    audio_end_token_id=102,
    image_token_index=103,
    video_token_index=104,
    vision_start_token_id=105,  # not a declared config field, but get_rope_index reads it (real configs carry it)
)  # ids that differ from AUDIO_TOKEN and PAD_TOKEN, inside the tiny vocabulary


def tiny_granite_speech(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A GraniteSpeechForConditionalGeneration: 2-block conformer (32 wide), 1-layer Q-Former, tiny Granite text."""
    from transformers import (
        Blip2QFormerConfig,
        GraniteConfig,
        GraniteSpeechConfig,
        GraniteSpeechEncoderConfig,
        GraniteSpeechForConditionalGeneration,
    )

    torch.manual_seed(seed)
    encoder = GraniteSpeechEncoderConfig(
        input_dim=MEL_BINS,
        num_layers=2,
        hidden_dim=32,
        feedforward_mult=2,
        num_heads=2,
        output_dim=8,
        context_size=16,
        max_pos_emb=32,
        conv_kernel_size=3,
    )
    projector = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        cross_attention_frequency=1,
    )
    config = GraniteSpeechConfig(
        text_config=GraniteConfig(**_TEXT),
        encoder_config=encoder,
        projector_config=projector,
        audio_token_index=AUDIO_TOKEN,
        has_lora_adapter=False,  # no PEFT adapter to switch on and off in generate()
        downsample_rate=GRANITE_DOWNSAMPLE,
        window_size=GRANITE_WINDOW,
        tie_word_embeddings=False,  # tied, the random model repeats one token whatever the prompt (a weak test)
    )
    model = GraniteSpeechForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn_implementation})  # the conformer cannot switch backends
    return model.eval()


def tiny_qwen2_5_omni_thinker(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A Qwen2_5OmniThinkerForConditionalGeneration: 2-layer audio tower, 1-block vision tower, tiny M-RoPE text."""
    from transformers import (
        Qwen2_5OmniAudioEncoderConfig,
        Qwen2_5OmniTextConfig,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2_5OmniVisionEncoderConfig,
    )

    torch.manual_seed(seed)
    audio = Qwen2_5OmniAudioEncoderConfig(
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        max_source_positions=64,
        n_window=8,
        output_dim=_TEXT["hidden_size"],
    )
    vision = Qwen2_5OmniVisionEncoderConfig(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=_TEXT["hidden_size"],
        fullatt_block_indexes=[0],
        patch_size=2,
        window_size=8,
    )
    text = Qwen2_5OmniTextConfig(
        **_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    )  # head_dim 16: the three M-RoPE sections cover head_dim / 2 frequencies
    config = Qwen2_5OmniThinkerConfig(
        audio_config=audio, vision_config=vision, text_config=text, audio_token_index=AUDIO_TOKEN, **_OMNI_SPECIAL
    )
    return _finish(Qwen2_5OmniThinkerForConditionalGeneration(config), attn_implementation)


def speech_inputs(family: str, audio_lengths: list[int], seed: int = 0) -> dict:
    """Left-padded prompts with ``audio_lengths[b]`` audio placeholders in row b, plus matching random audio features.

    Args:
        family: "granite_speech" or "qwen2_5_omni_thinker".
        audio_lengths: audio tokens per batch row (rows may differ).
        seed: seeds the text tokens and the features.

    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T) and the family's audio inputs: granite_speech
    ``input_features`` (B, F, MEL_BINS) float + ``input_features_mask`` (B, N) bool; qwen2_5_omni_thinker
    ``input_features`` (B, MEL_BINS, F) float + ``feature_attention_mask`` (B, F) long (right-padded frames).
    """
    prompt = audio_prompt(audio_lengths, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batch, longest = len(audio_lengths), max(audio_lengths)
    lengths = torch.tensor(audio_lengths)[:, None]  # (B, 1)
    if family == "granite_speech":
        per_window = GRANITE_WINDOW // GRANITE_DOWNSAMPLE
        windows = -(-longest // per_window)
        frames = windows * GRANITE_WINDOW
        features = torch.randn(batch, frames, MEL_BINS, generator=generator)  # (B, F, mel)
        mask = torch.arange(windows * per_window)[None, :] < lengths  # (B, N) projected tokens in use
        return {**prompt, "input_features": features, "input_features_mask": mask}
    if family == "qwen2_5_omni_thinker":
        frames = longest * OMNI_FRAMES_PER_TOKEN
        features = torch.randn(batch, MEL_BINS, frames, generator=generator)  # (B, mel, F)
        mask = (torch.arange(frames)[None, :] < lengths * OMNI_FRAMES_PER_TOKEN).long()  # (B, F)
        features = features * mask[:, None, :]
        return {**prompt, "input_features": features, "feature_attention_mask": mask}
    raise ValueError(f"unknown family {family!r}; use 'granite_speech' or 'qwen2_5_omni_thinker'.")
