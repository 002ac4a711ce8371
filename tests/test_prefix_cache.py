"""Cached keys and values of the text before the audio: same loss, gradients and scores as the whole prompt."""

import numpy as np
import pytest
import torch

from speechtrim.hf.prefix import PrefixCache
from tests.tiny_speechlm import tiny_speechlm

# different text lengths in front of the audio, so the cached prefixes are left-padded in the batch
PROMPTS = ["what the emotion : <audio> \n", "very very not the emotion is what : <audio> say \n", "<audio> say"]


def clips(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


def embedded(model, seconds=(0.4, 1.0, 0.7)):
    frames, mask = model.encode(clips(*seconds))
    return model.embed_audio(frames, mask)


@pytest.mark.parametrize("adapter", ["none", "attn_q_mean"])
def test_loss_and_gradients_match_the_whole_prompt(adapter):
    model = tiny_speechlm(adapter=adapter).train()
    targets = ["happy", "very very neutral", "sad"]
    grads = []
    losses = []
    for cache in (None, PrefixCache(model.llm)):
        model.zero_grad()
        batch = model.build_inputs(PROMPTS, *embedded(model), targets=targets, assistant_prefix="the emotion is",
                                   prefix_cache=cache)
        loss = model.loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        if cache is not None:
            assert batch.prefix is not None and batch.attention_mask.shape[1] > batch.inputs_embeds.shape[1]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_scores_match_the_whole_prompt_and_prefixes_are_reused():
    model = tiny_speechlm(adapter="mean")
    cache = PrefixCache(model.llm)
    candidates = ["angry", "happy sad", "very very neutral"]
    embeds, mask = embedded(model)
    whole = model.score(model.build_inputs(PROMPTS, embeds, mask), candidates)
    cached = model.score(model.build_inputs(PROMPTS, embeds, mask, prefix_cache=cache), candidates)
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-4)
    assert (cache.misses, cache.hits, len(cache)) == (2, 0, 2)  # the third prompt starts with the audio: nothing
    again = model.build_inputs(PROMPTS, embeds, mask, prefix_cache=cache)
    torch.testing.assert_close(model.score(again, candidates), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.score(again, candidates), whole, rtol=1e-4, atol=1e-4)  # batch reusable
    assert (cache.misses, cache.hits) == (2, 2)


def test_text_only_rows_match_the_whole_prompt():
    model = tiny_speechlm()
    embeds, mask = embedded(model)
    mask = torch.zeros_like(mask)  # the text-only baseline: no audio tokens at all
    cache = PrefixCache(model.llm)
    whole = model.score(model.build_inputs(PROMPTS, embeds, mask), ["sad", "happy"])
    cached = model.score(model.build_inputs(PROMPTS, embeds, mask, prefix_cache=cache), ["sad", "happy"])
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-4)
    assert cache.misses == 1  # the first prompt has no token after the audio: it runs whole, nothing to cache


def test_memory_bound_drops_the_least_recently_used():
    model = tiny_speechlm()
    cache = PrefixCache(model.llm, max_megabytes=1e-6)  # room for one entry only
    embeds, mask = embedded(model)
    for _ in range(2):
        model.build_inputs(PROMPTS, embeds, mask, prefix_cache=cache)
    assert len(cache) == 1 and (cache.misses, cache.hits) == (4, 0)


def test_refusals():
    model = tiny_speechlm()
    batch = model.build_inputs(PROMPTS[:1], *[t[:1] for t in embedded(model)], prefix_cache=PrefixCache(model.llm))
    with pytest.raises(ValueError, match="without prefix_cache"):
        model.generate(batch, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_megabytes"):
        PrefixCache(model.llm, max_megabytes=0)
