"""KV-cache eviction (H2O-style) on tiny random HF models: the cache really shrinks, by the right columns."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

from speechtrim.hf.attach import Attachment
from speechtrim.hf.kv_evict import kv_cache_bytes, shrink_states
from speechtrim.hf.layers import attn_implementation, cache_argument
from speechtrim.ops.plan import plan_from_slots
from speechtrim.ops.select import count_to_remove, evict_plan
from tests.fn_method import FnMethod, evictor
from tests.tiny_models import AUDIO_TOKEN, PAD_TOKEN, audio_prompt, tiny_llama, tiny_qwen2_audio, tiny_voxtral

BUILDERS = {"llama": tiny_llama, "qwen2_audio": tiny_qwen2_audio, "voxtral": tiny_voxtral}
DEPTH = 4


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_eager():
    return tiny_llama(attn_implementation="eager")


def h2o(ratio: float):
    """cache_plan_fn: drop the ``ratio`` fraction of each row's audio tokens with the lowest attention received."""

    def cache_plan_fn(layer_idx, scores, span_id):
        audio = span_id >= 0  # (B, T)
        return evict_plan(scores, audio, count_to_remove(audio.sum(dim=1), ratio))

    return cache_plan_fn


def attach(model, ratio: float, layers, **kwargs) -> Attachment:
    token = AUDIO_TOKEN if "audio_spans" not in kwargs and model.config.model_type == "llama" else None
    return Attachment(model, evictor(h2o(ratio), layers), audio_token_id=token, **kwargs)


def hook_count(model) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def reference_scores(model, prompt) -> list[torch.Tensor]:
    """Per-layer attention each key receives (B, T), from an eager model's attention probabilities."""
    out = model(**prompt, output_attentions=True)
    valid = prompt["attention_mask"].bool() if "attention_mask" in prompt else None
    scores = []
    for probs in out.attentions:  # (B, H, T, T)
        per_query = probs.sum(dim=1)  # (B, T_q, T_k)
        if valid is not None:
            per_query = per_query * valid[:, :, None]
        scores.append(per_query.sum(dim=1))  # (B, T_k)
    return scores


def expected_kept(scores: torch.Tensor, input_ids: torch.Tensor, ratio: float) -> list[list[int]]:
    """Per row, the kept column indices: every column but the lowest-scoring ``ratio`` share of audio columns."""
    rows = []
    for row_scores, row_ids in zip(scores, input_ids):
        audio = (row_ids == AUDIO_TOKEN).nonzero().squeeze(1)
        drop = int(count_to_remove(torch.tensor([audio.numel()]), ratio)[0])
        evicted = set(audio[row_scores[audio].argsort()[:drop]].tolist())
        rows.append([index for index in range(len(row_ids)) if index not in evicted])
    return rows


def test_cache_really_shrinks_only_at_evicting_layers(llama):
    prompt = audio_prompt([10], seed=1)
    length = prompt["input_ids"].shape[1]
    reference = llama(**prompt).past_key_values
    with attach(llama, 0.5, {1, 3}) as stats:
        out = llama(**prompt)
    cache = out.past_key_values
    shapes = [tuple(cache.layers[layer].keys.shape) for layer in range(DEPTH)]
    assert shapes == [(1, 2, length, 16), (1, 2, length - 5, 16), (1, 2, length, 16), (1, 2, length - 5, 16)]
    assert [cache.layers[layer].values.shape[2] for layer in range(DEPTH)] == [length, length - 5, length, length - 5]
    assert stats.removed_per_layer == [0, 5, 0, 5]
    assert stats.cache_tokens_per_layer == [length, length - 5, length, length - 5]
    assert stats.tokens_per_layer == [length] * DEPTH  # hidden states are not reduced
    assert torch.equal(out.logits, llama(**prompt).logits)  # prefill output untouched
    # Memory: 2 layers x (keys + values) x B=1 x H_kv=2 x 5 columns x d=16 x 4 bytes.
    assert kv_cache_bytes(reference) - kv_cache_bytes(cache) == 2 * 2 * 1 * 2 * 5 * 16 * 4


def test_full_cache_tensors_are_freed(llama):
    """Eviction drops the full-length tensors instead of keeping them alive next to the short ones."""
    prompt = audio_prompt([12], seed=2)
    refs = {}

    def remember(module, args, kwargs, output):  # registered first, so it runs before the eviction hook
        layer = cache_argument(kwargs).layers[module.layer_idx]
        refs[module.layer_idx] = (weakref.ref(layer.keys), weakref.ref(layer.values))

    handles = [layer.self_attn.register_forward_hook(remember, with_kwargs=True) for layer in llama.model.layers]
    try:
        with attach(llama, 0.5, {2}), torch.no_grad():  # as in generate(); autograd would keep its inputs
            out = llama(**prompt)
            gc.collect()
            assert refs[2][0]() is None and refs[2][1]() is None  # evicted layer: the full tensors are gone
            assert refs[1][0]() is out.past_key_values.layers[1].keys  # untouched layer: still the same tensor
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("layers", [{2}, {0, 1, 2, 3}])
def test_evicted_columns_are_the_lowest_attention_audio_tokens_of_that_layer(llama, llama_eager, layers):
    prompt = audio_prompt([5, 9], seed=3)  # left-padded, rows evict different counts (2 and 4)
    ratio = 0.4
    scores = reference_scores(llama_eager, prompt)
    reference = llama(**prompt).past_key_values  # same weights; SDPA, which the attachment switches to
    attachment = attach(llama_eager, ratio, layers)
    with attachment:
        cache = llama_eager(**prompt).past_key_values
    seen = {step.layer: step.scores for step in attachment.method.steps}
    assert attn_implementation(llama_eager) == "eager"
    length = prompt["input_ids"].shape[1]
    for layer in range(DEPTH):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        if layer not in layers:
            assert torch.equal(keys, reference.layers[layer].keys)
            continue
        assert torch.allclose(seen[layer], scores[layer], atol=1e-4)  # scores tapped from this layer itself
        kept = expected_kept(scores[layer], prompt["input_ids"], ratio)
        assert keys.shape[2] == length - 2 == max(len(row) for row in kept)
        for row, columns in enumerate(kept):
            audio = (prompt["input_ids"][row] == AUDIO_TOKEN).nonzero().squeeze(1).tolist()
            assert set(range(length)) - set(columns) <= set(audio)  # text and padding never evicted
            tail = slice(keys.shape[2] - len(columns), None)  # filler slots sit at the left of shorter rows
            assert torch.equal(keys[row, :, tail], reference.layers[layer].keys[row][:, columns])
            assert torch.equal(values[row, :, tail], reference.layers[layer].values[row][:, columns])


def test_plans_touching_text_are_refused_and_hooks_restored(llama_eager):
    prompt = audio_prompt([6], seed=4)
    before = hook_count(llama_eager)

    def evict_text(layer_idx, scores, span_id):
        keep = torch.ones_like(span_id, dtype=torch.bool)
        keep[:, 0] = False  # a text token
        return plan_from_slots(keep, keep, torch.ones_like(scores))

    with pytest.raises(ValueError, match="outside audio spans"):
        with Attachment(llama_eager, evictor(evict_text, {1}), audio_token_id=AUDIO_TOKEN):
            assert attn_implementation(llama_eager) != "eager"
            llama_eager(**prompt)
    assert hook_count(llama_eager) == before and attn_implementation(llama_eager) == "eager"

    def broken(layer_idx, scores, span_id):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Attachment(llama_eager, evictor(broken, {0, 3}), audio_token_id=AUDIO_TOKEN):
            llama_eager(**prompt)
    assert hook_count(llama_eager) == before and attn_implementation(llama_eager) == "eager"
    with attach(llama_eager, 0.3, {2}):
        assert hook_count(llama_eager) > before
    assert hook_count(llama_eager) == before and attn_implementation(llama_eager) == "eager"


def test_bad_arguments_are_refused(llama):
    with pytest.raises(ValueError, match="outside the decoder's layers"):
        Attachment(llama, evictor(h2o(0.3), {4}))
    with pytest.raises(ValueError, match="before layer 0, not at layer 2"):
        Attachment(llama, FnMethod(h2o(0.3), {2}, acts_on="embeddings"))
    with pytest.raises(ValueError, match="acts_on must be"):
        Attachment(llama, FnMethod(h2o(0.3), acts_on="weights"))
    with pytest.raises(ValueError, match="positions='original'"):
        Attachment(llama, evictor(h2o(0.3), {1}, positions="compact"))


@pytest.mark.parametrize("padded", [False, True])
def test_ratio_zero_gives_identical_logits_and_tokens(llama, padded):
    prompt = audio_prompt([5, 8] if padded else [8, 8], seed=5)
    settings = dict(max_new_tokens=5, do_sample=False)
    logits = llama(**prompt).logits
    tokens = llama.generate(**prompt, **settings)
    with attach(llama, 0.0, range(DEPTH)) as stats:
        assert torch.equal(llama(**prompt).logits, logits)
        assert torch.equal(llama.generate(**prompt, **settings), tokens)
    assert stats.removed_per_layer == [0] * DEPTH


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_evicted_cache(llama, num_beams):
    prompt = audio_prompt([10], seed=6)
    length = prompt["input_ids"].shape[1]
    new_tokens = 5
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams)
    with attach(llama, 0.3, {0, 2}) as stats:
        out = llama.generate(**prompt, return_dict_in_generate=True, **settings)
    assert out.sequences.shape == (1, length + new_tokens)
    done = length + new_tokens - 1
    lengths = [out.past_key_values.get_seq_length(layer) for layer in range(DEPTH)]
    assert lengths == [done - 3, done, done - 3, done]
    assert stats.prefill_calls == 1


def test_decode_logits_match_cache_columns_deleted_by_hand(llama, llama_eager):
    prompt = {"input_ids": audio_prompt([11], seed=7)["input_ids"]}
    length = prompt["input_ids"].shape[1]
    ratio, layers, steps = 0.5, (0, 2, 3), 4
    scores = reference_scores(llama_eager, prompt)  # which columns to delete: eager attention probabilities
    cache = llama(**prompt).past_key_values  # same weights, SDPA (stock eager cannot decode ragged caches)
    for layer in layers:  # the manual reference: delete the same columns, by hand
        kept = expected_kept(scores[layer], prompt["input_ids"], ratio)[0]
        cache.layers[layer].keys = cache.layers[layer].keys[:, :, kept]
        cache.layers[layer].values = cache.layers[layer].values[:, :, kept]
    manual_lengths = [cache.get_seq_length(layer) for layer in range(DEPTH)]
    assert manual_lengths == [length - 5, length, length - 5, length - 5]  # 11 audio tokens, 50 % -> 5
    prefill_logits = llama(**prompt).logits[:, -1]

    def decode(cache, first_logits):
        token, logits = first_logits.argmax(-1, keepdim=True), []
        for step in range(steps):
            position = torch.tensor([[length + step]])  # original positions, as generate() gives them
            step_logits = llama(input_ids=token, past_key_values=cache, position_ids=position).logits[:, -1]
            logits.append(step_logits)
            token = step_logits.argmax(-1, keepdim=True)
        return torch.stack(logits, dim=1)  # (1, steps, V)

    expected = decode(cache, prefill_logits)
    with attach(llama, ratio, set(layers)):
        out = llama(**prompt, past_key_values=DynamicCache())
        assert torch.allclose(out.logits[:, -1], prefill_logits, atol=1e-5)
        assert [out.past_key_values.get_seq_length(layer) for layer in range(DEPTH)] == manual_lengths
        got = decode(out.past_key_values, out.logits[:, -1])
        reduced_tokens = llama.generate(**prompt, max_new_tokens=steps + 1, do_sample=False)[:, length:]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(reduced_tokens[:, 1:], expected.argmax(-1))  # generate() follows the same decode
    assert not torch.allclose(expected, decode(llama(**prompt).past_key_values, prefill_logits), atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "llama-eager", "qwen2_audio", "voxtral"])
def test_left_padded_batch_rows_match_rows_run_alone(family):
    family, _, implementation = family.partition("-")
    model = BUILDERS[family](attn_implementation=implementation or "sdpa")
    audio_lengths = [4, 11, 7]
    batch = audio_prompt(audio_lengths, seed=8)
    settings = dict(max_new_tokens=5, do_sample=False)
    with attach(model, 0.4, {1, 2, 3}) as stats:
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        assert stats.removed_per_layer == [0, 2, 2, 2]  # row 0: 4 audio tokens, 40 % -> 2
        for row in range(len(audio_lengths)):
            width = int(batch["attention_mask"][row].sum())
            alone = {key: value[row : row + 1, -width:] for key, value in batch.items()}
            single = model.generate(**alone, **settings)[:, width:]
            assert torch.equal(together[row : row + 1], single), f"row {row} differs"


def test_shrink_states_merges_and_evicts():
    states = torch.arange(2 * 1 * 4 * 2, dtype=torch.float32).view(2, 1, 4, 2)  # (B, H_kv, T, d)
    keep = torch.tensor([[True, False, True, True], [True, True, True, True]])
    evicted = shrink_states(plan_from_slots(keep, keep, torch.ones(2, 4)), states)
    assert evicted.shape == (2, 1, 4, 2) and evicted.is_contiguous()
    assert torch.equal(evicted[0, 0, 1:], states[0, 0, [0, 2, 3]])  # slot 0 of row 0 is a filler
    starts = torch.tensor([[True, False, True, True]] * 2)
    merged = shrink_states(plan_from_slots(starts, torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4)), states)
    assert torch.equal(merged[:, 0, 0], states[:, 0, :2].mean(dim=1))
    assert torch.equal(merged[:, 0, 1:], states[:, 0, 2:])


@pytest.mark.parametrize("name, options", [("h2o", {}), ("snapkv", {"window": 3, "kernel": 3})])
@pytest.mark.parametrize("schedule", ["constant", "decay"])
@pytest.mark.parametrize("lengths", [[10], [6, 13]])  # one row; a left-padded batch with different audio lengths
def test_stacked_evictions_equal_layer_by_layer_evictions(llama, monkeypatch, name, options, schedule, lengths):
    """A short prompt's cache evictions are planned in one call for every layer; caches, layouts, stats and the
    generated tokens must be those of planning each layer right after its own attention (the oracle)."""
    from speechtrim import reducers
    from speechtrim.hf import attach as attach_module
    from speechtrim.hf import kv_evict

    prompt = audio_prompt(lengths, seed=5)
    reducer = reducers.build(name, ratio=0.4, layer=1, schedule=schedule, **options)
    stacked_calls = []
    real = kv_evict.evict_layers_with_plan
    monkeypatch.setattr(attach_module, "evict_layers_with_plan",
                        lambda layers, *args: stacked_calls.append(list(layers)) or real(layers, *args))
    runs = {}
    for limit in (attach_module.STACKED_EVICTION_BYTES, 0):  # stacked, then layer by layer
        monkeypatch.setattr(attach_module, "STACKED_EVICTION_BYTES", limit)
        with torch.no_grad(), reducer(llama, audio_token_id=AUDIO_TOKEN) as stats:
            cache = llama(**prompt, use_cache=True).past_key_values
            summary = dataclasses.asdict(stats)
            tokens = llama.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN)
            runs[limit] = (cache, summary, tokens)
    (cache, stats, tokens), (oracle_cache, oracle_stats, oracle_tokens) = runs.values()
    active = sum(ratio > 0 for ratio in stats["ratios"])  # decay: one ratio a layer, so one group a layer
    assert active > 1 and sum(len(layers) for layers in stacked_calls) == 2 * active  # the forward, then generate
    assert stats == oracle_stats and sum(stats["removed_per_layer"]) > 0
    for layer, oracle_layer in zip(cache.layers, oracle_cache.layers):
        assert torch.equal(layer.keys, oracle_layer.keys) and torch.equal(layer.values, oracle_layer.values)
    assert torch.equal(tokens, oracle_tokens)
