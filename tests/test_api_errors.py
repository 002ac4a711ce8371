"""Python API misuse: each gets a clear ValueError that names the problem and the fix."""

import numpy as np
import pytest
import torch

from speechtrim import adapters, reducers
from speechtrim.audio import AudioError, load_audio
from tests.tiny_models import AUDIO_TOKEN, tiny_llama


def test_two_reducers_on_one_model_say_so():
    model = tiny_llama()
    first = reducers.build("fastadasp", ratio=0.3, layer=1)
    second = reducers.build("fastv", ratio=0.3, layer=1)
    with first(model, audio_token_id=AUDIO_TOKEN):
        with pytest.raises(ValueError, match="already attached to this model; reducers do not stack"):
            with second(model, audio_token_id=AUDIO_TOKEN):
                pass
    with second(model, audio_token_id=AUDIO_TOKEN):  # the first one's exit released the model
        pass


def test_a_numeric_schedule_does_not_silently_override_ratio():
    with pytest.raises(ValueError, match=r"schedule=0.5 already sets the ratios and would override ratio=0.3"):
        reducers.build("fastadasp", ratio=0.3, schedule=0.5)


def test_adapter_build_checks_the_name_first():
    with pytest.raises(ValueError, match=r"unknown adapter 'x'; choose one of \['attn_mean'"):
        adapters.build("x")
    with pytest.raises(ValueError, match="needs dim="):
        adapters.build("mean")


@pytest.mark.parametrize("name", ["mean", "concat", "conv", "none"])
def test_output_length_refuses_negative_frames(name):
    adapter = adapters.build(name, dim=8)
    with pytest.raises(ValueError, match="an int >= 0, got -3"):
        adapter.output_length(-3)
    assert adapter.output_length(0) >= 0


def test_load_audio_refuses_a_fractional_rate():
    with pytest.raises(AudioError, match="sample_rate must be a whole number of Hz, got 16000.5"):
        load_audio(np.zeros(1600, dtype=np.float32), 16000.5)
    assert load_audio(np.zeros(1600, dtype=np.float32), 16000.0).shape == (1600,)


def test_eager_models_are_warned_that_scores_come_from_sdpa(caplog):
    model = tiny_llama(attn_implementation="eager")
    with caplog.at_level("WARNING"):
        with reducers.build("fastv", ratio=0.0, layer=1)(model, audio_token_id=AUDIO_TOKEN):
            pass
    assert "not bit-identical to the eager model" in caplog.text
    assert torch.is_tensor(model.get_input_embeddings().weight)


def test_inputs_embeds_without_input_ids_names_the_configs_audio_token_id():
    model = tiny_llama()
    model.config.audio_token_id = AUDIO_TOKEN
    embeds = model.get_input_embeddings()(torch.full((1, 8), AUDIO_TOKEN))
    with pytest.raises(ValueError, match=f"audio token id is {AUDIO_TOKEN}, but the call passed inputs_embeds without"):
        with reducers.build("fastv", ratio=0.3, layer=1)(model):
            model(inputs_embeds=embeds)


def test_stats_count_each_rows_own_tokens_in_a_padded_batch():
    from tests.tiny_models import audio_prompt

    model = tiny_llama()
    inputs = audio_prompt([4, 10])  # row 0 is left-padded by 6
    with reducers.build("fastv", ratio=0.5, layer=1)(model, audio_token_id=AUDIO_TOKEN) as stats:
        model(**inputs)
    short, long = stats.tokens_per_row
    assert short[0] == 3 + 4 + 4 and long[0] == 3 + 10 + 4  # padding not counted
    assert stats.tokens_per_layer == short and short[1] == 3 + 2 + 4 and long[1] == 3 + 5 + 4


def tiny_gemma3n():
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=[64] * 4, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
        num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
        layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma3nForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["fastadasp", "fastv", "h2o"])
def test_gemma3n_is_refused_clearly_before_any_hook(name):
    model = tiny_gemma3n()
    layer = model.model.layers[1]
    with pytest.raises(ValueError, match="Gemma-3n style.*not supported by speechtrim reducers"):
        with reducers.build(name, ratio=0.3, layer=1)(model, audio_spans=[[(1, 5)]]):
            pass
    assert not layer._forward_pre_hooks and not model.model._forward_pre_hooks  # nothing was left attached
