"""The reducer matrix: every registered reducer x model family x {unpadded, left-padded}, plus option checks."""

import numpy as np
import pytest
import torch

from speechtrim import reducers
from tests.tiny_models import (
    AUDIO_TOKEN,
    audio_prompt,
    speech_inputs,
    tiny_granite_speech,
    tiny_llama,
    tiny_qwen2_5_omni_thinker,
    tiny_qwen2_audio,
    tiny_voxtral,
)
from tests.tiny_speechlm import tiny_speechlm

FAMILIES = ["llama", "qwen2_audio", "voxtral", "granite_speech", "qwen2_5_omni_thinker", "speechlm"]
WITH_AUDIO_FEATURES = {"granite_speech": tiny_granite_speech, "qwen2_5_omni_thinker": tiny_qwen2_5_omni_thinker}
AUDIO_LENGTHS = [12, 20, 9]
LAYER = 2  # tiny models have 4 decoder layers (speechlm: 2, it uses layer 1)


class Case:
    """A model and a batch in a uniform shape: run(inputs) for logits, generate(inputs), rows for solo runs."""

    def __init__(self, family: str) -> None:
        self.family = family
        if family == "speechlm":
            self.speech = tiny_speechlm(seed=3)
            self.model = self.speech.llm
            rng = np.random.default_rng(0)
            self.audios = [(0.1 * rng.standard_normal(int(n * 320 * 2))).astype(np.float32) for n in (0.6, 1.0, 0.4)]
            self.layer = 1
        else:
            builders = {"llama": tiny_llama, "qwen2_audio": tiny_qwen2_audio, "voxtral": tiny_voxtral,
                        **WITH_AUDIO_FEATURES}
            self.model = builders[family]()
            self.layer = LAYER
        self.token_id = AUDIO_TOKEN if family == "llama" else None

    def inputs(self, rows: list[int]) -> tuple[dict, list | None]:
        """Model kwargs for the chosen rows (left-padded together) and explicit spans when needed."""
        if self.family == "speechlm":
            batch = self.speech.prepare([self.audios[i] for i in rows], ["what the emotion : <audio> \n"] * len(rows))
            kwargs = {"inputs_embeds": batch.inputs_embeds, "attention_mask": batch.attention_mask}
            return kwargs, batch.audio_spans
        if self.family in WITH_AUDIO_FEATURES:  # real audio inputs through the model's own audio tower
            full = speech_inputs(self.family, AUDIO_LENGTHS, seed=5)
        else:
            full = audio_prompt(AUDIO_LENGTHS, seed=5)
        if len(rows) == len(AUDIO_LENGTHS):
            return full, None
        # one row as it sits in the full batch, without its left padding (audio inputs keep their frame axis)
        row = rows[0]
        width = int(full["attention_mask"][row].sum())
        prompt = {key: value[row : row + 1] for key, value in full.items()}
        prompt["input_ids"], prompt["attention_mask"] = prompt["input_ids"][:, -width:], prompt["attention_mask"][:, -width:]
        return prompt, None

    def logits(self, kwargs: dict) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**kwargs).logits[:, -1]

    def generate(self, kwargs: dict) -> torch.Tensor:
        out = self.model.generate(**kwargs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        return out if "inputs_embeds" in kwargs else out[:, kwargs["input_ids"].shape[1] :]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return Case(request.param)


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", reducers.names())
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_reducer_matrix(case, name, padded):
    rows = [0, 1, 2] if padded else [1]
    kwargs, spans = case.inputs(rows)
    before = hook_count(case.model)
    attention = str(case.model.config._attn_implementation)
    reference = case.logits(kwargs)
    pre_llm = reducers.REDUCERS.get(name).acts_on == "embeddings"  # reduces the decoder's input embeddings
    layer = None if pre_llm else case.layer
    if getattr(reducers.REDUCERS.get(name), "needs_ctc_head", False):  # a hub model has no CTC head
        with pytest.raises(ValueError, match="CTC logits"):
            reducers.build(name, ratio=0.5)(case.model, spans, case.token_id)
        assert hook_count(case.model) == before
        return

    with reducers.build(name, ratio=0.0, layer=layer)(case.model, spans, case.token_id):
        same = case.logits(kwargs)
    assert torch.equal(same, reference), "ratio 0 must leave the logits untouched"

    reducer = reducers.build(name, ratio=0.5, layer=layer, seed=1)
    with reducer(case.model, spans, case.token_id) as stats:
        case.logits(kwargs)
        lengths = stats.tokens_per_layer
        together = case.generate(kwargs)
    assert hook_count(case.model) == before and str(case.model.config._attn_implementation) == attention
    evicts = reducer.acts_on == "cache"
    if evicts:  # prefill runs on every token; the KV cache of the reduction layers shrinks
        assert len(set(lengths)) == 1 and stats.flops_reduction == 0
        lengths = stats.cache_tokens_per_layer
    full = stats.input_tokens
    layer = stats.layer
    assert lengths[:layer] == [full] * layer
    assert all(length < full for length in lengths[layer:]), lengths
    audio_row0 = (spans[0][0][1] - spans[0][0][0]) if spans else AUDIO_LENGTHS[rows[0]]
    requested, removed = stats.requested_per_layer[layer], stats.removed_per_layer[layer]
    assert requested == audio_row0 // 2
    assert lengths[layer] == full - removed, "only audio goes; every text token stays"
    if name == "a_tome":  # disjoint pairs: a greedy pick can block its neighbours, and stats say so
        assert requested // 2 <= removed <= requested
        assert (removed < requested) == (layer in stats.short_layers)
    else:
        assert removed == requested and not stats.short_layers
    assert evicts or 0 < stats.flops_reduction < 1

    if padded:  # every row of the padded batch decodes like that row alone
        for position, row in enumerate(rows):
            alone_kwargs, alone_spans = case.inputs([row])
            with reducer(case.model, alone_spans, case.token_id):
                alone = case.generate(alone_kwargs)
            assert torch.equal(together[position : position + 1], alone), f"row {row} differs when padded"


def test_dense_schedules_reduce_at_every_layer_from_the_first():
    model = tiny_llama()
    prompt = audio_prompt([40], seed=2)
    for schedule in ("constant", "decay"):
        with reducers.build("fastadasp", ratio=0.3, layer=1, schedule=schedule)(model, audio_token_id=AUDIO_TOKEN) as stats:
            model(**prompt)
        lengths = stats.tokens_per_layer
        assert lengths[0] == 47 > lengths[1] > lengths[2], (schedule, lengths)
        if schedule == "constant":
            assert lengths[2] > lengths[3] and stats.ratios == [0.0, 0.3, 0.3, 0.3]
        else:  # linear decay reaches exactly 0 at the last layer
            assert lengths[2] == lengths[3] and stats.ratios == [0.0, 0.3, 0.15, 0.0]


def test_flops_target_is_met_and_solved_per_prompt():
    model = tiny_llama()
    prompt = audio_prompt([60], seed=4)
    with reducers.build("fastadasp", flops_reduction=0.3, layer=1)(model, audio_token_id=AUDIO_TOKEN) as stats:
        model(**prompt)
    assert stats.flops_reduction == pytest.approx(0.3, abs=0.03)


def test_short_spans_reduce_what_they_can_and_say_so():
    model = tiny_llama()
    prompt = audio_prompt([1], seed=6)  # one audio token: nothing can merge
    with reducers.build("fastadasp", ratio=0.9, layer=1, schedule="constant")(model, audio_token_id=AUDIO_TOKEN) as stats:
        model(**prompt)
    assert stats.tokens_per_layer == [8, 8, 8, 8]
    prompt = audio_prompt([3], seed=6)
    with reducers.build("a_tome", ratio=0.9, layer=1)(model, audio_token_id=AUDIO_TOKEN) as stats:
        model(**prompt)
    assert stats.requested_per_layer[1] == 2 and stats.removed_per_layer[1] == 1 and stats.short_layers == [1]


@pytest.mark.parametrize(
    "params, message",
    [
        ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be"),
        ({}, "exactly one of ratio"),
        ({"ratio": 0.3, "flops_reduction": 0.3}, "exactly one of ratio"),
        ({"ratio": 0.3, "layer": -1}, "layer must be"),
        ({"ratio": 0.3, "schedule": "cosine"}, "unknown schedule"),
    ],
)
def test_bad_options_are_refused_when_built(params, message):
    with pytest.raises(ValueError, match=message):
        reducers.build("fastadasp", **params)


def test_bad_attachments_are_refused_and_leave_no_hooks():
    model = tiny_llama()
    before = hook_count(model)
    with pytest.raises(ValueError, match="beyond the model's depth"):
        reducers.build("fastv", ratio=0.3, layer=4)(model, audio_token_id=AUDIO_TOKEN)
    with pytest.raises(ValueError, match="layer must be >= 1"):
        reducers.build("fastadasp", ratio=0.3, layer=0)(model, audio_token_id=AUDIO_TOKEN)
    with pytest.raises(ValueError, match="unknown reducer"):
        reducers.build("tome2000", ratio=0.3)
    with pytest.raises(RuntimeError, match="boom"):
        with reducers.build("fastadasp", ratio=0.3, layer=1)(model, audio_token_id=AUDIO_TOKEN):
            raise RuntimeError("boom")
    assert hook_count(model) == before and model.config._attn_implementation == "sdpa"


def test_fastadasp_merges_as_equations_4_to_6_say():
    """The hidden states entering the reduction layer equal a hand-built merge from eager attention and keys."""
    from speechtrim.ops import adjacent_similarity, apply_plan, count_to_remove, merge_plan

    model = tiny_llama(attn_implementation="eager")
    prompt = audio_prompt([16], seed=8)
    layer = 2
    with torch.no_grad():
        out = model(**prompt, output_attentions=True, output_hidden_states=True, use_cache=True)
    span_id = torch.where(prompt["input_ids"] == AUDIO_TOKEN, 0, -1)
    keys = out.past_key_values.layers[layer - 1].keys  # (B, H_kv, T, d), post-rotary, as cached
    weights = out.attentions[layer - 1].sum(dim=(1, 2))  # (B, T): summed over heads and every query (eq. 5)
    plan = merge_plan(adjacent_similarity(keys, span_id), weights * (span_id >= 0),
                      count_to_remove(torch.tensor([16]), 0.4), chain=True)
    expected = apply_plan(plan, out.hidden_states[layer])  # (B, T_new, D): eq. 6

    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).clone())

    with reducers.build("fastadasp", ratio=0.4, layer=layer)(model, audio_token_id=AUDIO_TOKEN):
        handle = model.model.layers[layer].register_forward_pre_hook(record, with_kwargs=True)  # runs after ours
        try:
            with torch.no_grad():
                model(**prompt)
        finally:
            handle.remove()
    torch.testing.assert_close(seen["hidden"], expected, rtol=1e-4, atol=1e-5)


def test_h2o_really_frees_kv_cache_memory():
    from speechtrim.hf.kv_evict import kv_cache_bytes

    model = tiny_llama()
    prompt = audio_prompt([30], seed=7)  # 3 text + 30 audio + 4 text tokens
    with torch.no_grad():
        full = kv_cache_bytes(model(**prompt, use_cache=True).past_key_values)
        with reducers.build("h2o", ratio=0.5)(model, audio_token_id=AUDIO_TOKEN) as stats:
            reduced = kv_cache_bytes(model(**prompt, use_cache=True).past_key_values)
    assert stats.cache_tokens_per_layer == [22, 22, 22, 22] and stats.tokens_per_layer == [37, 37, 37, 37]
    assert reduced * 37 == full * 22


@pytest.mark.parametrize("name", ["fastadasp", "a_tome", "fastv", "random_merge"])
def test_several_audio_spans_in_one_row_reduce_separately(name):
    model = tiny_llama()
    input_ids = torch.randint(3, AUDIO_TOKEN, (1, 30), generator=torch.Generator().manual_seed(0))
    spans = [[(2, 12), (15, 27)]]  # two clips with text between them
    kept = {}

    def record(module, args, kwargs):
        kept.setdefault("hidden", (args[0] if args else kwargs["hidden_states"]).shape[1])

    with reducers.build(name, ratio=0.5, layer=1)(model, audio_spans=spans) as stats:
        handle = model.model.layers[1].register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                model(input_ids=input_ids)
        finally:
            handle.remove()
    assert stats.requested_per_layer[1] == 11  # half of the 22 audio tokens, counted over both spans
    assert kept["hidden"] == 30 - stats.removed_per_layer[1] and stats.removed_per_layer[1] >= 8


def test_no_audio_tokens_is_a_clear_error():
    model = tiny_llama()
    prompt = audio_prompt([0], seed=1)  # text only
    with pytest.raises(ValueError, match="audio"):
        with reducers.build("fastadasp", ratio=0.3, layer=1)(model, audio_token_id=AUDIO_TOKEN):
            model(**prompt)
