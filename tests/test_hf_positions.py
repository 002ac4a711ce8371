"""Compact position re-numbering (``positions="compact"``) on tiny random HF models: exactness, decode, padding.

The shared tiny builders barely react to RoPE (initializer_range 0.02, rope_theta 1e4): a wrong position would
change their logits by ~1e-3 and leave greedy tokens alone. These tests build the tiny llama with a larger
initializer range and a small rope_theta, so that renumbering changes logits by O(1) and flips greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from speechtrim import reducers
from speechtrim.hf.attach import Attachment
from speechtrim.ops.plan import plan_from_slots
from tests.fn_method import FnMethod, scored
from tests.tiny_models import (
    _TEXT,
    AUDIO_TOKEN,
    audio_prompt,
    tiny_qwen2_5_omni_thinker,
    tiny_qwen2_audio,
    tiny_voxtral,
)

GREEDY = dict(do_sample=False, pad_token_id=0)


def rope_sensitive_llama(seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The tiny 4-layer llama, with weights and rotary frequencies large enough that positions matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**_TEXT, initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10.0})
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return rope_sensitive_llama()


def evict_odd_audio(layers: set[int]):
    """plan_fn that evicts every other audio token of each row (the 2nd, 4th, ...) at the given layers."""

    def plan_fn(layer_idx, hidden, span_id, scores):
        if layer_idx not in layers:
            return None
        audio = span_id >= 0  # (B, T)
        rank = audio.long().cumsum(dim=1)  # 1-based running index of the row's audio tokens
        keep = ~(audio & (rank % 2 == 0))
        return plan_from_slots(keep, keep, torch.ones(hidden.shape[:2]))

    return plan_fn


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def kept_after_odd_eviction(input_ids: torch.Tensor) -> torch.Tensor:
    """(T,) bool, the tokens of a single row that survive :func:`evict_odd_audio`."""
    audio = input_ids[0] == AUDIO_TOKEN
    return ~audio | (audio.long().cumsum(0) % 2 == 1)


def test_compact_eviction_at_layer_zero_equals_shortened_input(llama):
    input_ids = audio_prompt([12], seed=8)["input_ids"]
    kept = kept_after_odd_eviction(input_ids)
    shortened = input_ids[:, kept]  # (1, n)
    gapped = torch.arange(input_ids.shape[1])[kept][None]  # the survivors' original ids
    with torch.no_grad():
        reference = llama(input_ids=shortened).logits  # default positions 0..n-1
        with Attachment(llama, FnMethod(evict_odd_audio({0}), positions="compact"), audio_token_id=AUDIO_TOKEN) as stats:
            compact = llama(input_ids=input_ids).logits
            compact_tokens = llama.generate(input_ids=input_ids, max_new_tokens=8, **GREEDY)[:, input_ids.shape[1] :]
        with Attachment(llama, FnMethod(evict_odd_audio({0})), audio_token_id=AUDIO_TOKEN):
            original = llama(input_ids=input_ids).logits
            original_tokens = llama.generate(input_ids=input_ids, max_new_tokens=8, **GREEDY)[:, input_ids.shape[1] :]
        with_gaps = llama(input_ids=shortened, position_ids=gapped).logits
    assert compact.shape == reference.shape == (1, int(kept.sum()), 128)
    assert torch.allclose(compact, reference, atol=1e-4)
    assert stats.tokens_per_layer == [int(kept.sum())] * 4
    expected_tokens = llama.generate(input_ids=shortened, max_new_tokens=8, **GREEDY)[:, shortened.shape[1] :]
    assert torch.equal(compact_tokens, expected_tokens)
    # The model really reacts to positions: "original" keeps the gaps, and that is a different computation.
    assert torch.allclose(original, with_gaps, atol=1e-4)
    assert (original - compact).abs().max() > 0.5
    assert not torch.equal(original_tokens, compact_tokens)


@pytest.mark.parametrize("layers", [{2}, {2, 3}], ids=["layer2", "layers2-3"])
def test_compact_decode_continues_each_layers_numbering(llama, layers):
    """Cached decode (positions shifted per layer) must equal re-running the whole prefill at every step."""
    prompt = audio_prompt([10], seed=3)
    length = prompt["input_ids"].shape[1]
    plan_fn = evict_odd_audio(layers)
    with torch.no_grad(), Attachment(llama, FnMethod(plan_fn, positions="compact"), audio_token_id=AUDIO_TOKEN) as stats:
        settings = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True, **GREEDY)
        out = llama.generate(**prompt, **settings)
        assert stats.tokens_per_layer[2] == length - 5
        recomputed = llama.generate(**prompt, use_cache=False, **settings)
    assert torch.equal(out.sequences, recomputed.sequences)
    for step, (cached, full) in enumerate(zip(out.logits, recomputed.logits)):
        assert torch.allclose(cached, full, atol=1e-4), f"decode step {step} differs from a full prefill"
    lengths = [out.past_key_values.get_seq_length(layer) for layer in range(4)]
    assert lengths[:2] == [length + 5] * 2 and lengths[2] == length
    with torch.no_grad(), Attachment(llama, FnMethod(plan_fn), audio_token_id=AUDIO_TOKEN):
        original = llama.generate(**prompt, max_new_tokens=6, **GREEDY)
    assert not torch.equal(original, out.sequences)  # the renumbering is visible in the tokens


@pytest.mark.parametrize("schedule", ["none", "constant"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_compact_fastadasp_at_layer_two_generates(llama, schedule, num_beams):
    prompt = audio_prompt([16], seed=4)
    length = prompt["input_ids"].shape[1]
    reducer = reducers.build("fastadasp", ratio=0.5, layer=2, schedule=schedule, positions="compact")
    before = hook_count(llama)
    with torch.no_grad(), reducer(llama, audio_token_id=AUDIO_TOKEN) as stats:
        out = llama.generate(**prompt, max_new_tokens=5, min_new_tokens=5, num_beams=num_beams,
                             past_key_values=DynamicCache(), return_dict_in_generate=True, **GREEDY)
        lengths = stats.tokens_per_layer
    assert hook_count(llama) == before
    assert out.sequences.shape == (1, length + 5)
    assert lengths[:2] == [length] * 2 and lengths[2] == length - 8
    assert lengths[3] == (length - 12 if schedule == "constant" else length - 8)
    cache = [out.past_key_values.get_seq_length(layer) for layer in range(4)]
    assert cache == [count + 4 for count in lengths]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["evict_odd", "fastadasp"])
def test_compact_padded_batch_rows_match_rows_alone(implementation, method):
    model = rope_sensitive_llama(attn_implementation=implementation)
    audio_lengths = [4, 11, 7]
    batch = audio_prompt(audio_lengths, seed=9)
    if method == "evict_odd":
        session = Attachment(model, FnMethod(evict_odd_audio({0, 2}), positions="compact"), audio_token_id=AUDIO_TOKEN)
    else:
        session = reducers.build("fastadasp", ratio=0.5, layer=1, schedule="constant", positions="compact")(
            model, audio_token_id=AUDIO_TOKEN
        )
    with torch.no_grad(), session:
        together = model.generate(**batch, max_new_tokens=5, **GREEDY)[:, batch["input_ids"].shape[1] :]
        for row in range(len(audio_lengths)):
            width = int(batch["attention_mask"][row].sum())
            alone = {key: value[row : row + 1, -width:] for key, value in batch.items()}
            single = model.generate(**alone, max_new_tokens=5, **GREEDY)[:, width:]
            assert torch.equal(together[row : row + 1], single), f"row {row} differs"


@pytest.mark.parametrize("build", [tiny_qwen2_audio, tiny_voxtral], ids=["qwen2_audio", "voxtral"])
def test_compact_through_composite_speech_llms(build):
    """The text decoder's rotary module is found inside composite models; padded rows still equal solo rows."""
    model = build()
    batch = audio_prompt([4, 11, 7], seed=9)
    reducer = reducers.build("avg_merge", ratio=0.5, layer=1, schedule="constant", positions="compact")
    with torch.no_grad(), reducer(model) as stats:
        together = model.generate(**batch, max_new_tokens=4, **GREEDY)[:, batch["input_ids"].shape[1] :]
        for row in range(3):
            width = int(batch["attention_mask"][row].sum())
            alone = {key: value[row : row + 1, -width:] for key, value in batch.items()}
            single = model.generate(**alone, max_new_tokens=4, **GREEDY)[:, width:]
            assert torch.equal(together[row : row + 1], single), f"row {row} differs"
        assert stats.tokens_per_layer[3] < stats.tokens_per_layer[0]


def test_original_is_the_default(llama):
    assert reducers.build("fastadasp", ratio=0.3).positions == "original"
    prompt = audio_prompt([5, 9], seed=6)
    logits = {}
    with torch.no_grad():
        for positions in (None, "original", "compact"):
            options = {} if positions is None else {"positions": positions}
            with Attachment(llama, FnMethod(evict_odd_audio({1}), **options), audio_token_id=AUDIO_TOKEN):
                logits[positions] = llama(**prompt).logits
    assert torch.equal(logits[None], logits["original"])
    assert not torch.allclose(logits["original"], logits["compact"], atol=1e-2)


def test_bad_positions_and_unsupported_models_are_refused(llama):
    with pytest.raises(ValueError, match="positions"):
        reducers.build("fastadasp", ratio=0.3, positions="bad")
    with pytest.raises(ValueError, match="positions"):
        Attachment(llama, FnMethod(evict_odd_audio({1}), positions="sequential"), audio_token_id=AUDIO_TOKEN)
    before = hook_count(llama)
    with pytest.raises(ValueError, match="KV-cache evictors"):
        with reducers.build("h2o", ratio=0.5, positions="compact")(llama, audio_token_id=AUDIO_TOKEN):
            pass
    assert hook_count(llama) == before
    thinker = tiny_qwen2_5_omni_thinker()
    before = hook_count(thinker)
    with pytest.raises(ValueError, match="M-RoPE"):
        with reducers.build("avg_merge", ratio=0.5, layer=1, positions="compact")(thinker):
            pass
    assert hook_count(thinker) == before
    with reducers.build("avg_merge", ratio=0.5, layer=1)(thinker):  # "original" still attaches
        pass
