"""SnapKV against a hand computation from eager attention: which audio KV entries each layer keeps."""

from __future__ import annotations

import pytest
import torch

from speechtrim import reducers
from speechtrim.ops.select import count_to_remove
from tests.tiny_models import AUDIO_TOKEN, audio_prompt, tiny_llama

WINDOW, KERNEL, RATIO = 3, 5, 0.4  # with these, no pooling (kernel 1) or every query (window 100) keeps other entries


def expected_kept(model, prompt, layer: int) -> list[list[int]]:
    """Per row, the cache columns SnapKV keeps at ``layer``, from the eager model's attention probabilities."""
    with torch.no_grad():
        probs = model(**prompt, output_attentions=True).attentions[layer]  # (B, H, T, T)
    valid = prompt["attention_mask"].bool()
    rows = []
    for row in range(probs.shape[0]):
        real = valid[row].nonzero().squeeze(1)
        window = real[-WINDOW:]  # the last real queries
        scores = probs[row][:, window].sum(dim=(0, 1))  # (T,) attention each key gets from the window
        audio = (prompt["input_ids"][row] == AUDIO_TOKEN).nonzero().squeeze(1)
        pooled = {}
        for index in audio.tolist():  # mean over the audio keys within KERNEL // 2 of each audio key
            near = [j for j in audio.tolist() if abs(j - index) <= KERNEL // 2]
            pooled[index] = float(scores[near].mean())
        drop = int(count_to_remove(torch.tensor([len(audio)]), RATIO)[0])
        evicted = set(sorted(pooled, key=pooled.get)[:drop])
        rows.append([index for index in real.tolist() if index not in evicted])
    return rows


@pytest.mark.parametrize("layer", [1, 3])
def test_snapkv_keeps_what_the_end_of_the_prompt_attends_to(layer):
    model = tiny_llama(attn_implementation="eager")
    prompt = audio_prompt([9, 14], seed=3)  # left-padded rows
    reference = model(**prompt, use_cache=True).past_key_values  # full cache, same weights
    kept = expected_kept(model, prompt, layer)
    reducer = reducers.build("snapkv", ratio=RATIO, layer=layer, schedule="none", window=WINDOW, kernel=KERNEL)
    with reducer(model, audio_token_id=AUDIO_TOKEN) as stats:
        cache = model(**prompt, use_cache=True).past_key_values
    assert stats.acts_on == "cache" and stats.removed_per_layer[layer] == int(count_to_remove(torch.tensor([9]), RATIO))
    keys, full = cache.layers[layer].keys, reference.layers[layer].keys  # (B, H_kv, T_kept, d), (B, H_kv, T, d)
    for row, columns in enumerate(kept):
        torch.testing.assert_close(keys[row, :, -len(columns):], full[row, :, columns], atol=1e-5, rtol=1e-5)


def test_snapkv_options_are_checked():
    with pytest.raises(ValueError, match="window"):
        reducers.build("snapkv", ratio=0.3, window=0)
    with pytest.raises(ValueError, match="kernel"):
        reducers.build("snapkv", ratio=0.3, kernel=4)
