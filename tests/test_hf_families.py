"""Reducer plumbing on two more native HF speech LLM families: Granite-Speech and Qwen2.5-Omni's thinker.

Both are tiny random models built in code (tests/tiny_models.py) and fed real audio features, so the audio tower,
the projector and the splice into the text decoder all run; the audio spans come from each config's token id.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from speechtrim.hf.attach import TESTED_FAMILIES, Attachment
from speechtrim.hf.attention import BACKEND_NAME
from speechtrim.hf.layers import attn_implementation, text_backbone
from speechtrim.hf.spans import audio_token_id, find_audio_spans
from speechtrim.ops.plan import identity_plan, plan_from_slots
from tests.fn_method import FnMethod, scored
from tests.tiny_models import speech_inputs, tiny_granite_speech, tiny_qwen2_5_omni_thinker

BUILDERS = {"granite_speech": tiny_granite_speech, "qwen2_5_omni_thinker": tiny_qwen2_5_omni_thinker}
FAMILIES = sorted(BUILDERS)
TEXT_AFTER = 4  # text tokens after the audio in tests.tiny_models.audio_prompt


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, BUILDERS[request.param]()


def evict_odd_audio(layers: set[int]):
    """plan_fn that evicts every other audio token (the 2nd, 4th, ... of each row) at the given layers."""

    def plan_fn(layer_idx, hidden, span_id, scores):
        if layer_idx not in layers:
            return None
        audio = span_id >= 0  # (B, T)
        keep = ~(audio & (audio.long().cumsum(dim=1) % 2 == 0))  # (B, T)
        return plan_from_slots(keep, keep, torch.ones(hidden.shape[:2]))

    return plan_fn


def identity_fn(layer_idx, hidden, span_id, scores):
    return identity_plan(hidden.shape[0], hidden.shape[1], hidden.device)


def hook_count(model) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def row_alone(batch: dict, row: int) -> dict:
    """Batch row ``row`` without its left padding; audio inputs keep their (padded) frame axis."""
    width = int(batch["attention_mask"][row].sum())
    alone = {key: value[row : row + 1] for key, value in batch.items()}
    alone["input_ids"] = alone["input_ids"][:, -width:]
    alone["attention_mask"] = alone["attention_mask"][:, -width:]
    return alone


def test_families_are_tested_and_decoders_found(family_model):
    family, model = family_model
    assert model.config.model_type == family and family in TESTED_FAMILIES
    backbone = text_backbone(model)
    assert backbone.depth == 4 and backbone.hidden_size == 64
    assert backbone.model_type == {"granite_speech": "granite", "qwen2_5_omni_thinker": "qwen2_5_omni_text"}[family]


def test_audio_spans_come_from_the_config_token_id(family_model):
    family, model = family_model
    configured = int(model.config.audio_token_index)  # both families keep it here
    assert audio_token_id(model.config) == configured
    audio_lengths = [3, 6]
    batch = speech_inputs(family, audio_lengths, seed=1)
    seen = {}

    def recorder(layer_idx, hidden, span_id, scores):
        seen.setdefault(layer_idx, span_id.clone())
        return None

    with Attachment(model, FnMethod(recorder)):  # no audio_token_id: read from the config
        model(**batch)
    width = batch["input_ids"].shape[1]
    expected = [[(width - TEXT_AFTER - length, width - TEXT_AFTER)] for length in audio_lengths]
    assert find_audio_spans(batch["input_ids"], configured) == expected
    span_id = seen[0]  # (B, T)
    assert torch.equal(span_id >= 0, batch["input_ids"] == configured)
    assert (span_id >= 0).sum(dim=1).tolist() == audio_lengths


def test_omni_token_id_is_found_through_the_full_model_config():
    thinker = tiny_qwen2_5_omni_thinker().config
    thinker.audio_token_index = 77  # a value no other field holds
    assert audio_token_id(SimpleNamespace(thinker_config=thinker)) == 77  # Qwen2_5OmniConfig layout


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_plan_gives_identical_logits(family, implementation):
    model = BUILDERS[family](attn_implementation=implementation)
    batch = speech_inputs(family, [5, 9], seed=2)
    reference = model(**batch).logits
    with Attachment(model, FnMethod(identity_fn)):
        logits = model(**batch).logits
    assert torch.equal(logits, reference)


def test_eviction_at_layer_one_shrinks_later_layers_and_generates(family_model):
    family, model = family_model
    audio = 10
    batch = speech_inputs(family, [audio], seed=3)
    length = batch["input_ids"].shape[1]
    new_tokens = 4
    before = hook_count(model)
    with Attachment(model, scored(evict_odd_audio({1}), {1})) as stats:
        assert attn_implementation(model) == BACKEND_NAME
        logits = model(**batch).logits
        assert stats.tokens_per_layer == [length] + [length - audio // 2] * 3
        assert stats.removed_per_layer == [0, audio // 2, 0, 0]
        assert logits.shape[1] == length - audio // 2
        out = model.generate(
            **batch,
            past_key_values=DynamicCache(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.sequences.shape == (1, length + new_tokens)
    done = length + new_tokens - 1
    cached = [out.past_key_values.get_seq_length(layer) for layer in range(4)]
    assert cached == [done] + [done - audio // 2] * 3
    assert hook_count(model) == before and attn_implementation(model) == "sdpa"


def test_left_padded_batch_rows_match_rows_run_alone(family_model):
    family, model = family_model
    audio_lengths = [4, 11, 7]
    batch = speech_inputs(family, audio_lengths, seed=4)
    settings = dict(max_new_tokens=5, do_sample=False)
    with Attachment(model, scored(evict_odd_audio({1, 3}), {1, 3})) as stats:
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        assert stats.prefill_calls == 1
        for row in range(len(audio_lengths)):
            alone = row_alone(batch, row)
            single = model.generate(**alone, **settings)[:, alone["input_ids"].shape[1] :]
            assert torch.equal(together[row : row + 1], single), f"{family} row {row} differs"
    assert len({tuple(row) for row in together.tolist()}) > 1  # rows differ: the comparison can fail


def test_hooks_removed_after_exit_and_after_exception(family_model):
    family, model = family_model
    before = hook_count(model)
    batch = speech_inputs(family, [6], seed=5)
    attachment = Attachment(model, scored(identity_fn, {2}))
    with attachment:
        assert hook_count(model) > before and attachment.attached
        model(**batch)

    def broken(layer_idx, hidden, span_id, scores):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Attachment(model, scored(broken, {1})):
            model(**batch)
    assert hook_count(model) == before and attn_implementation(model) == "sdpa"


def test_omni_mrope_eviction_equals_shortened_prompt_with_gathered_3d_positions():
    """3-D position ids whose rows differ (as for video): evicting at layer 0 = feeding the kept tokens alone."""
    model = tiny_qwen2_5_omni_thinker()
    input_ids = speech_inputs("qwen2_5_omni_thinker", [8], seed=6)["input_ids"]  # (1, T), placeholders only
    length = input_ids.shape[1]
    steps = torch.arange(length)
    position_ids = torch.stack([steps, 37 * steps + 5, 101 * steps + 11])[:, None, :]  # (3, 1, T) t/h/w rows
    with Attachment(model, FnMethod(evict_odd_audio({0}))) as stats:
        reduced = model(input_ids=input_ids, position_ids=position_ids).logits
    audio = input_ids[0] == model.config.audio_token_index
    kept = ~(audio & (audio.long().cumsum(0) % 2 == 0))  # (T,)
    shortened = model(input_ids=input_ids[:, kept], position_ids=position_ids[..., kept]).logits
    assert stats.tokens_per_layer == [int(kept.sum())] * 4
    assert reduced.shape == shortened.shape
    assert torch.allclose(reduced, shortened, atol=1e-6)
    # The three M-RoPE rows matter: the temporal row alone gives logits ~1e-2 away (the check above can fail).
    flat = model(input_ids=input_ids[:, kept], position_ids=position_ids[:1, :, kept].expand(3, -1, -1)).logits
    assert (flat - shortened).abs().max() > 1e-3
