"""Transfer-entropy layer selection (FastAdaSP eqs. 7-8) and layer="auto"."""

import math

import pytest
import torch

from speechtrim import reducers
from speechtrim.layer_selection import gaussian_entropy, select_layer, transfer_entropy
from speechtrim.layer_store import selected_layer
from tests.tiny_models import AUDIO_TOKEN, audio_prompt, tiny_llama


def test_entropy_is_sum_of_log_std_per_channel():
    torch.manual_seed(0)
    stds = torch.tensor([0.5, 2.0, 3.0])
    features = torch.randn(1, 20000, 3) * stds
    assert float(gaussian_entropy(features)[0]) == pytest.approx(float(torch.log(stds).sum()), abs=0.02)
    valid = torch.zeros(1, 20000, dtype=torch.bool)
    valid[0, :10] = True
    features[0, 10:] = 1e6  # invalid tokens must not count
    manual = torch.log(features[0, :10].std(dim=0)).sum()
    assert float(gaussian_entropy(features, valid)[0]) == pytest.approx(float(manual), rel=1e-5)


def test_transfer_entropy_ranks_layers_and_feeds_layer_auto(tmp_cache):
    model = tiny_llama(seed=1)
    batches = [dict(**audio_prompt([24, 18], seed=s), audio_token_id=AUDIO_TOKEN) for s in (1, 2)]
    with pytest.raises(ValueError, match="select-layer"):
        reducers.build("fastadasp", ratio=0.3, layer="auto")(model, audio_token_id=AUDIO_TOKEN)
    entropies = transfer_entropy(model, batches, progress=False)
    assert sorted(entropies) == [1, 2, 3]
    assert all(math.isfinite(value) and value >= 0 for value in entropies.values())
    assert len(set(entropies.values())) == 3, "different layers change the final features differently"
    best, again = select_layer(model, batches, progress=False)
    assert again == entropies and best == min(entropies, key=entropies.get)
    assert selected_layer(model) == best
    with reducers.build("fastadasp", ratio=0.3, layer="auto")(model, audio_token_id=AUDIO_TOKEN) as stats:
        model(**audio_prompt([24], seed=3))
    assert stats.layer == best and stats.tokens_per_layer[best] < stats.tokens_per_layer[0]


def test_ratio_zero_has_zero_transfer_entropy():
    model = tiny_llama(seed=2)
    batches = [dict(**audio_prompt([10, 16], seed=4), audio_token_id=AUDIO_TOKEN)]
    entropies = transfer_entropy(model, batches, layers=[1, 3], ratio=0.0, progress=False)
    assert entropies == {1: 0.0, 3: 0.0}


def test_bad_candidates_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="candidate layers"):
        transfer_entropy(model, [audio_prompt([5])], layers=[0, 9], progress=False)


def test_a_selection_is_keyed_on_the_audio_path_that_feeds_the_llm(tmp_cache):
    """The same LLM behind another projector sees other audio tokens: its stored selection must not be reused."""
    from speechtrim.layer_store import find_selection, model_key, save_selection
    from speechtrim.models.speechlm import SpeechLM
    from tests.tiny_speechlm import tiny_speechlm

    first = tiny_speechlm()
    save_selection(first.llm, {1: 0.2, 2: 0.1}, "fastadasp", 0.5, {"data": "pocketsphinx", "clips": 2})
    assert selected_layer(first.llm) == 2
    other = SpeechLM(first.encoder, first.feature_extractor, first.llm, first.tokenizer)
    with torch.no_grad():
        other.projector.weight.add_(1.0)
    assert other.llm is first.llm and find_selection(other.llm) is None
    with pytest.raises(ValueError, match="select-layer"):
        selected_layer(other.llm)
    again = SpeechLM(first.encoder, first.feature_extractor, first.llm, first.tokenizer)
    again.load_state_dict(first.state_dict())
    assert model_key(again.llm) == model_key(first.llm) == find_selection(again.llm).stem


def test_a_packaged_selection_is_used_when_this_machine_has_none(tmp_cache, tmp_path, monkeypatch):
    import json

    from speechtrim import layer_store
    from speechtrim.layer_store import find_selection, model_key, stored_selection

    model = tiny_llama(seed=4)
    packaged = tmp_path / "weights" / "tiny" / "layer-selection.json"
    packaged.parent.mkdir(parents=True)
    packaged.write_text(json.dumps({"model_key": "0" * 16, "selected_layer": 1}))
    monkeypatch.setattr(layer_store, "packaged_selection_paths", lambda: [packaged])
    assert find_selection(model) is None, "a packaged selection of another model is not used"
    packaged.write_text(json.dumps({"model_key": model_key(model), "selected_layer": 3}))
    assert stored_selection(model) == (3, packaged)
    with reducers.build("fastadasp", ratio=0.3, layer="auto")(model, audio_token_id=AUDIO_TOKEN) as stats:
        model(**audio_prompt([24], seed=3))
    assert stats.layer == 3
