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
