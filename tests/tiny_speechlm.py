"""A tiny random SpeechLM built entirely in code: Whisper-style encoder, llama LLM, word-level tokenizer."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from speechtrim.models.speechlm import SpeechLM

WORDS = ["<pad>", "<eos>", "<unk>", "the", "emotion", "is", "audio", ":", "angry", "happy", "sad", "neutral",
         "transcribe", "this", "what", "say", "very", "not", "\n", "<audio>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_speechlm(adapter: str = "none", seed: int = 0, init_range: float = 0.02, layers: int = 2,
                  max_positions: int = 512, **adapter_params) -> SpeechLM:
    torch.manual_seed(seed)
    whisper = WhisperModel(
        WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                      decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=80, vocab_size=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)
    ).eval()
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(WORDS), hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=0,
                    eos_token_id=1, bos_token_id=1, initializer_range=init_range)
    ).eval()
    return SpeechLM(whisper.get_encoder(), WhisperFeatureExtractor(feature_size=80), llm, tiny_tokenizer(),
                    adapter=adapter, adapter_params=adapter_params)
