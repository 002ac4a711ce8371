"""Attach plumbing on tiny random HF models: hooks, exactness, eviction equivalence, generate, padding, caches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache, StaticCache

from speechtrim.hf.attach import Attachment
from speechtrim.hf.attention import BACKEND_NAME, register_backend
from speechtrim.hf.layers import attn_implementation, set_text_attn_implementation, text_backbone
from speechtrim.ops.plan import identity_plan, plan_from_slots
from tests.fn_method import FnMethod, scored
from tests.tiny_models import AUDIO_TOKEN, audio_prompt, tiny_llama, tiny_qwen2, tiny_qwen2_audio, tiny_voxtral

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen2_audio": tiny_qwen2_audio, "voxtral": tiny_voxtral}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def evict_odd_audio(layers: set[int]):
    """plan_fn that evicts every other token of each audio span (odd offsets) at the given layers."""

    def plan_fn(layer_idx, hidden, span_id, scores):
        if layer_idx not in layers:
            return None
        audio = span_id >= 0  # (B, T)
        offset = audio.long().cumsum(dim=1)  # 1-based running index of audio tokens in the row
        keep = ~(audio & (offset % 2 == 0))
        return plan_from_slots(keep, keep, torch.ones(hidden.shape[:2]))

    return plan_fn


def identity_fn(layer_idx, hidden, span_id, scores):
    return identity_plan(hidden.shape[0], hidden.shape[1], hidden.device)


def hook_count(model) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def test_hooks_removed_after_exit_and_after_exception(llama):
    before = hook_count(llama)
    prompt = audio_prompt([6], seed=1)
    attachment = Attachment(llama, scored(identity_fn, {2}), audio_token_id=AUDIO_TOKEN)
    with attachment:
        assert hook_count(llama) > before
        assert attn_implementation(llama) == BACKEND_NAME
        llama(**prompt)
        assert attachment.attached
    assert hook_count(llama) == before and attn_implementation(llama) == "sdpa"

    def broken(layer_idx, hidden, span_id, scores):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Attachment(llama, scored(broken, {1}), audio_token_id=AUDIO_TOKEN):
            llama(**prompt)
    assert hook_count(llama) == before and attn_implementation(llama) == "sdpa"


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_identity_plan_gives_identical_logits(padded, implementation):
    model = tiny_qwen2(attn_implementation=implementation)
    prompt = audio_prompt([5, 8] if padded else [8, 8], seed=2)
    reference = model(**prompt).logits
    with Attachment(model, FnMethod(identity_fn), audio_token_id=AUDIO_TOKEN):
        logits = model(**prompt).logits
    assert torch.equal(logits, reference)


def test_tapped_backend_without_taps_is_sdpa_bit_for_bit(llama):
    prompt = audio_prompt([4, 9], seed=3)
    reference = llama(**prompt).logits
    register_backend()
    previous = set_text_attn_implementation(llama, BACKEND_NAME)
    try:
        logits = llama(**prompt).logits
    finally:
        set_text_attn_implementation(llama, previous)
    assert previous == "sdpa"
    assert torch.equal(logits, reference)
    # Taps only read: identity plans with scores requested at every layer still give identical logits.
    with Attachment(llama, scored(identity_fn, {1, 2, 3}), audio_token_id=AUDIO_TOKEN):
        tapped = llama(**prompt).logits
    assert torch.equal(tapped, reference)


def test_scores_are_previous_layer_attention_column_sums():
    model = tiny_llama(attn_implementation="eager")
    prompt = audio_prompt([5, 9], seed=4)
    attentions = model(**prompt, output_attentions=True).attentions  # per layer (B, H, T, T)
    valid = prompt["attention_mask"].bool()
    expected = {
        layer: (attentions[layer - 1].sum(dim=1) * valid[:, :, None]).sum(dim=1) for layer in (1, 3)
    }  # (B, T) attention each key gets from valid queries
    seen = {}

    def recorder(layer_idx, hidden, span_id, scores):
        seen[layer_idx] = scores
        return None

    method = scored(recorder, {1, 3})
    with Attachment(model, method, audio_token_id=AUDIO_TOKEN):
        model(**prompt)
    keys = next(step.keys for step in method.steps if step.layer == 3)
    assert sorted(seen) == [1, 3]  # the method runs at its active layers only
    for layer in (1, 3):
        assert torch.allclose(seen[layer], expected[layer], atol=1e-4)
    assert keys.shape == (2, 2, prompt["input_ids"].shape[1], 16)  # (B, H_kv, T, head_dim)


def test_eviction_at_layer_zero_matches_shortened_input(llama):
    prompt = audio_prompt([10], seed=5)
    input_ids = prompt["input_ids"]
    with Attachment(llama, FnMethod(evict_odd_audio({0})), audio_token_id=AUDIO_TOKEN) as stats:
        reduced = llama(input_ids=input_ids).logits
    plan = evict_odd_audio({0})(0, torch.zeros(1, input_ids.shape[1], 1), (input_ids == AUDIO_TOKEN).long() - 1, None)
    kept = plan.slot[0] >= 0
    positions = torch.arange(input_ids.shape[1])[kept][None]
    shortened = llama(input_ids=input_ids[:, kept], position_ids=positions).logits
    assert reduced.shape == shortened.shape == (1, int(kept.sum()), 128)
    assert torch.allclose(reduced, shortened, atol=1e-5)
    assert stats.tokens_per_layer == [int(kept.sum())] * 4


def test_reduction_at_layer_two_shrinks_later_layers(llama):
    prompt = audio_prompt([8, 8], seed=6)
    length = prompt["input_ids"].shape[1]
    with Attachment(llama, FnMethod(evict_odd_audio({2})), audio_token_id=AUDIO_TOKEN) as stats:
        logits = llama(**prompt).logits
    assert stats.tokens_per_layer == [length, length, length - 4, length - 4]
    assert stats.removed_per_layer == [0, 0, 4, 0]
    assert logits.shape[1] == length - 4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_ragged_dynamic_cache(llama, num_beams):
    prompt = audio_prompt([10], seed=7)
    length = prompt["input_ids"].shape[1]
    new_tokens = 5
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=num_beams)
    with Attachment(llama, FnMethod(evict_odd_audio({2})), audio_token_id=AUDIO_TOKEN) as stats:
        out = llama.generate(**prompt, past_key_values=DynamicCache(), return_dict_in_generate=True, **settings)
    assert out.sequences.shape == (1, length + new_tokens)
    lengths = [out.past_key_values.get_seq_length(layer) for layer in range(4)]
    done = length + new_tokens - 1
    assert lengths == [done, done, done - 5, done - 5]
    assert stats.prefill_calls == 1


def test_generate_after_layer_zero_eviction_equals_shortened_prompt(llama):
    prompt = audio_prompt([12], seed=8)
    input_ids = prompt["input_ids"]
    with Attachment(llama, FnMethod(evict_odd_audio({0})), audio_token_id=AUDIO_TOKEN):
        reduced = llama.generate(input_ids=input_ids, max_new_tokens=6, do_sample=False)
    kept = (input_ids[0] != AUDIO_TOKEN) | ((input_ids[0] == AUDIO_TOKEN).long().cumsum(0) % 2 == 1)
    positions = torch.arange(input_ids.shape[1])[kept][None]
    shortened = llama.generate(input_ids=input_ids[:, kept], position_ids=positions, max_new_tokens=6, do_sample=False)
    assert torch.equal(reduced[:, input_ids.shape[1] :], shortened[:, int(kept.sum()) :])


@pytest.mark.parametrize("family", ["llama", "llama-eager", "qwen2_audio", "voxtral"])
def test_left_padded_batch_rows_match_rows_run_alone(family):
    family, _, implementation = family.partition("-")
    model = BUILDERS[family](attn_implementation=implementation or "sdpa")
    audio_lengths = [4, 11, 7]
    batch = audio_prompt(audio_lengths, seed=9)
    settings = dict(max_new_tokens=5, do_sample=False)
    plan_fn = evict_odd_audio({1, 3})
    token = None if family != "llama" else AUDIO_TOKEN  # composites read it from their config
    with Attachment(model, scored(plan_fn, {1, 3}), audio_token_id=token) as stats:
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        assert stats.prefill_calls == 1
        for row, length in enumerate(audio_lengths):
            width = int(batch["attention_mask"][row].sum())
            alone = {key: value[row : row + 1, -width:] for key, value in batch.items()}
            single = model.generate(**alone, **settings)[:, width:]
            assert torch.equal(together[row : row + 1], single), f"row {row} differs"


def test_static_cache_is_refused(llama):
    prompt = audio_prompt([6], seed=10)
    before = hook_count(llama)
    cache = StaticCache(config=llama.config, max_cache_len=64)
    with pytest.raises(ValueError, match="DynamicCache"):
        with Attachment(llama, FnMethod(evict_odd_audio({1})), audio_token_id=AUDIO_TOKEN):
            llama.generate(**prompt, past_key_values=cache, max_new_tokens=2)
    assert hook_count(llama) == before


def test_unsupported_attention_and_bad_plans_are_refused(llama):
    llama.config._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(ValueError, match="set_attn_implementation"):
            Attachment(llama, FnMethod(identity_fn), audio_token_id=AUDIO_TOKEN).attach()
    finally:
        llama.config._attn_implementation_internal = "sdpa"

    def evict_text(layer_idx, hidden, span_id, scores):
        keep = torch.ones(hidden.shape[:2], dtype=torch.bool)
        keep[:, 0] = False  # a text token
        return plan_from_slots(keep, keep, torch.ones(hidden.shape[:2]))

    with pytest.raises(ValueError, match="outside audio spans"):
        with Attachment(llama, FnMethod(evict_text), audio_token_id=AUDIO_TOKEN):
            llama(**audio_prompt([6], seed=11))
    with pytest.raises(ValueError, match="audio_spans="):
        with Attachment(llama, FnMethod(identity_fn)):
            llama(**audio_prompt([6], seed=11))
    with pytest.raises(ValueError, match="outside the decoder's layers"):
        Attachment(llama, scored(identity_fn, {9}))


def test_explicit_audio_spans_with_inputs_embeds(llama):
    prompt = audio_prompt([8], seed=12)
    embeds = llama.get_input_embeddings()(prompt["input_ids"])
    start = int((prompt["input_ids"][0] == AUDIO_TOKEN).nonzero()[0])
    with Attachment(llama, FnMethod(evict_odd_audio({1})), audio_spans=[[(start, start + 8)]]) as stats:
        from_embeds = llama(inputs_embeds=embeds).logits
    with Attachment(llama, FnMethod(evict_odd_audio({1})), audio_token_id=AUDIO_TOKEN):
        from_ids = llama(input_ids=prompt["input_ids"]).logits
    assert torch.allclose(from_embeds, from_ids, atol=1e-6)
    assert stats.tokens_per_layer[1] == prompt["input_ids"].shape[1] - 4


def test_text_attention_switch_leaves_audio_encoder_alone():
    model = tiny_qwen2_audio()
    audio_before = model.config.audio_config._attn_implementation
    with Attachment(model, scored(identity_fn, {1})):
        assert text_backbone(model).config._attn_implementation == BACKEND_NAME
        assert model.config.audio_config._attn_implementation == audio_before
    assert attn_implementation(model) == "sdpa"


def test_mrope_position_ids_are_gathered_on_the_last_axis(llama):
    attachment = Attachment(llama, FnMethod(identity_fn), audio_token_id=AUDIO_TOKEN)
    keep = torch.tensor([[True, False, True, True, False, True]])
    plan = plan_from_slots(keep, keep, torch.ones(1, 6))
    positions = torch.arange(6).view(1, 1, 6).expand(3, 1, 6) * torch.tensor([1, 10, 100]).view(3, 1, 1)
    cos = torch.arange(6.0).view(1, 1, 6, 1).expand(3, 1, 6, 4)
    kwargs = {"position_ids": positions, "position_embeddings": (cos, cos), "attention_mask": None}
    out = attachment._gather_inputs(kwargs, plan, torch.zeros(1, 4, 64))
    assert out["position_ids"].tolist() == [[[0, 2, 3, 5]], [[0, 20, 30, 50]], [[0, 200, 300, 500]]]
    assert out["position_embeddings"][0][0, 0, :, 0].tolist() == [0.0, 2.0, 3.0, 5.0]
    assert out["attention_mask"] is None  # still plain causal


def test_eager_and_sdpa_agree_after_reduction():
    prompt = audio_prompt([5, 10], seed=13)
    logits = {}
    for implementation in ("sdpa", "eager"):
        model = tiny_llama(attn_implementation=implementation)
        with Attachment(model, FnMethod(evict_odd_audio({1})), audio_token_id=AUDIO_TOKEN):
            logits[implementation] = model(**prompt).logits[:, -4:]  # text after audio (pad rows differ in stock)
    assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-5)


def test_beam_search_reorders_row_layouts_with_the_cache(llama):
    """Beams of one prompt may get different plans (e.g. random reducers): layouts must follow the beam reorder."""
    prompt = audio_prompt([9], seed=14)

    def row_dependent(layer_idx, hidden, span_id, scores):
        if layer_idx != 1:
            return None
        audio = span_id >= 0
        rank = audio.long().cumsum(dim=1)
        row = torch.arange(hidden.shape[0])[:, None]
        keep = ~(audio & (rank % (row + 2) == 0))  # a different eviction per beam row
        return plan_from_slots(keep, keep, torch.ones(hidden.shape[:2]))

    batch = {key: value.expand(3, -1) for key, value in prompt.items()}
    attachment = Attachment(llama, FnMethod(row_dependent), audio_token_id=AUDIO_TOKEN)
    with attachment:
        cache = DynamicCache()
        llama(**batch, past_key_values=cache)
        layout = attachment._state.layouts[2].clone()  # (3, T_2) valid cache columns per row
        assert not torch.equal(layout[0], layout[1])
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        assert torch.equal(attachment._state.layouts[2], layout[[2, 0, 1]])
        out = llama.generate(**prompt, max_new_tokens=4, num_beams=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, prompt["input_ids"].shape[1] + 4)
    assert "reorder_cache" not in vars(out.past_key_values)  # the per-instance wrapper is gone


def test_a_method_that_needs_only_keys_gets_keys_and_no_scores(llama):
    """Keys-only methods (A-ToMe) skip the per-key attention sums, the costly part of a tap."""
    method = FnMethod(identity_fn, {2}, frozenset({"keys"}))
    with Attachment(llama, method, audio_token_id=AUDIO_TOKEN):
        llama(**audio_prompt([6], seed=15))
    (step,) = method.steps
    assert step.scores is None and step.keys is not None and step.keys.shape[2] == step.span_id.shape[1]


def _naive_scores(query, key, value, allowed, valid):
    """The definition: full softmax over allowed keys, column sums over heads and valid queries, and P V."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = (query @ key.transpose(2, 3)) * query.shape[-1] ** -0.5
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs.sum(dim=1) * valid[:, :, None]).sum(dim=1), probs @ value


@pytest.mark.parametrize("block_rows", [8, None])  # several blocks, the last one short; or the default (one block)
@pytest.mark.parametrize("mask_kind", ["none", "causal-bool-padded", "not-causal", "additive-padded"])
def test_one_pass_scoring_gives_the_attention_output_and_the_column_sums(mask_kind, block_rows):
    from speechtrim.hf import attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, width = 2, 6, 2, 37, 8
    query = torch.randn(batch, heads, length, width, generator=generator)
    key = torch.randn(batch, kv_heads, length, width, generator=generator)
    value = torch.randn(batch, kv_heads, length, width, generator=generator)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None].expand(batch, 1, length, length).clone()
    valid = torch.ones(batch, length, dtype=torch.bool)
    if mask_kind in ("causal-bool-padded", "additive-padded"):
        allowed[1, :, :, :5] = False  # left padding of row 1: its first queries see no key at all (NaN rows -> 0)
        valid[1, :5] = False
    if mask_kind == "none":
        valid[0, 3] = False  # a query that does not count in the sums (a filler slot)
    if mask_kind == "not-causal":
        allowed[:, :, 3, 20] = True  # one query sees a later key: no causal shortcut allowed
    mask = None if mask_kind == "none" else allowed
    if mask_kind == "additive-padded":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    expected_scores, expected_output = _naive_scores(query, key, value, allowed, valid)
    previous = attention._SCORE_BLOCK_ROWS
    attention._SCORE_BLOCK_ROWS = block_rows or previous
    try:
        scores, output = attention.key_attention_scores(query, key, mask, None, query_valid=valid, value=value)
        two_pass = attention.key_attention_scores(query, key, mask, None, query_valid=valid)
    finally:
        attention._SCORE_BLOCK_ROWS = previous
    assert torch.allclose(scores, expected_scores, atol=1e-5)
    assert torch.allclose(two_pass, expected_scores, atol=1e-5)
    assert not output.isnan().any()  # a query that sees no key gets 0, never NaN (it would poison later layers)
    rows = valid[:, None, :, None]  # fully masked padding queries: outputs are not compared
    assert torch.allclose(output * rows, expected_output * rows, atol=1e-5)


def test_tapped_inference_takes_the_one_pass_path_and_matches_sdpa(llama, monkeypatch):
    from speechtrim.hf import attention

    prompt = audio_prompt([4, 9], seed=3)
    seen = {}

    def recorder(layer_idx, hidden, span_id, scores):
        seen[layer_idx] = scores.clone()
        return None

    with torch.no_grad():
        reference = llama(**prompt).logits
        calls = []
        real = attention.key_attention_scores
        monkeypatch.setattr(attention, "key_attention_scores",
                            lambda *args, **kwargs: calls.append("value" in kwargs) or real(*args, **kwargs))
        with Attachment(llama, scored(recorder, {1, 2, 3}), audio_token_id=AUDIO_TOKEN):
            fused = llama(**prompt).logits
        one_pass, fused_calls = dict(seen), list(calls)
        monkeypatch.setattr(attention, "_fusable", lambda *args: False)
        with Attachment(llama, scored(recorder, {1, 2, 3}), audio_token_id=AUDIO_TOKEN):
            llama(**prompt)
    assert len(fused_calls) == 3 and all(fused_calls)  # every tapped layer's output came from the scoring pass
    assert not any(calls[3:])  # and the second run really took SDPA plus the separate pass
    assert torch.allclose(fused, reference, atol=1e-5)
    for layer in (1, 2, 3):
        assert torch.allclose(one_pass[layer], seen[layer], atol=1e-5)


@pytest.mark.parametrize("offset", [0, 3])
def test_the_blockwise_causality_check_agrees_with_the_whole_mask(offset):
    """``_within_causal`` looks at a few rows at a time; it must agree with the triangle of the whole mask."""
    from speechtrim.hf.attention import _within_causal

    generator = torch.Generator().manual_seed(offset)
    q_length = 21
    kv_length = q_length + offset
    causal = torch.ones(q_length, kv_length, dtype=torch.bool).tril(diagonal=offset)
    for trial in range(60):
        mask = causal & (torch.rand(q_length, kv_length, generator=generator) > 0.3)  # padding-like holes
        if trial % 2:  # one query sees one later key
            row = int(torch.randint(0, q_length - 1, (1,), generator=generator))
            mask[row, int(torch.randint(row + offset + 1, kv_length, (1,), generator=generator))] = True
        mask = mask[None, None].expand(2, 1, q_length, kv_length)
        expected = not bool(torch.triu(mask, diagonal=offset + 1).any())
        for rows in (1, 4, 8, 64):
            assert _within_causal(mask, offset, rows) is expected


def test_decode_over_a_full_layout_skips_the_mask_and_matches_the_built_one(llama, monkeypatch):
    """A reduced layer whose cache columns are all real gets no decode mask (what decode_mask would return) without
    building one per step; the logits equal those of the path that builds it, and a stale 2-D mask is refused."""
    from speechtrim import reducers
    from speechtrim.hf.state import PrefillState

    prompt = audio_prompt([12], seed=4)  # one row: no padding

    def decode(steps: int, stale_mask: bool = False) -> list[torch.Tensor]:
        cache = DynamicCache()
        mask = prompt["attention_mask"]
        logits = []
        with torch.no_grad(), reducers.build("fastv", ratio=0.5, layer=1)(llama, audio_token_id=AUDIO_TOKEN):
            out = llama(**prompt, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(dim=-1)
            for _ in range(steps):
                mask = mask if stale_mask else torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                out = llama(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(dim=-1)
        return logits

    real, answers = PrefillState.layout_is_full, []
    monkeypatch.setattr(PrefillState, "layout_is_full",
                        lambda self, layer_idx: answers.append(real(self, layer_idx)) or answers[-1])
    fast = decode(4)
    assert answers and all(answers)  # every reduced layer took the fast path at every step
    monkeypatch.setattr(PrefillState, "layout_is_full", lambda self, layer_idx: False)
    built = decode(4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast, built))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="extend the 2-D mask"):
        decode(1, stale_mask=True)


@pytest.mark.parametrize("name", ["fastadasp", "h2o"])
def test_a_layer_that_removes_nothing_is_skipped_with_its_scoring(llama, monkeypatch, name):
    """A layer whose ratio rounds to 0 tokens (a small ratio on a short prompt) runs no plan and no scoring pass for
    it; the logits, caches and stats equal those of planning it anyway (an identity plan: the oracle)."""
    from speechtrim import reducers
    from speechtrim.hf import attention

    prompt = audio_prompt([10, 7], seed=6)
    # layer 2's ratio removes round(0.04 * 10) = 0 tokens; layers 1 and 3 remove some
    reducer = reducers.build(name, ratio=0, schedule=[0.0, 0.5, 0.04, 0.5])
    real = attention.key_attention_scores
    runs = {}
    for skipping in (True, False):
        if not skipping:  # the oracle: every layer with a ratio > 0 plans, whatever it removes
            monkeypatch.setattr(Attachment, "_removes", lambda self, state, ratio: ratio > 0)
        calls = []
        monkeypatch.setattr(attention, "key_attention_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
        with torch.no_grad(), reducer(llama, audio_token_id=AUDIO_TOKEN) as stats:
            out = llama(**prompt, use_cache=True)
        runs[skipping] = (out, dataclasses.asdict(stats), len(calls))
    (out, stats, scorings), (oracle, oracle_stats, oracle_scorings) = runs[True], runs[False]
    assert stats["requested_per_layer"][2] == 0 and stats["removed_per_layer"][3] > 0
    assert scorings == oracle_scorings - 1  # the pass that would have scored layer 2's plan did not run
    assert stats == oracle_stats
    assert torch.allclose(out.logits, oracle.logits, atol=1e-6)
    for layer, oracle_layer in zip(out.past_key_values.layers, oracle.past_key_values.layers):
        assert torch.allclose(layer.keys, oracle_layer.keys, atol=1e-6)
