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
