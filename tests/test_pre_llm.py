"""Pre-LLM reducers: fixed output counts, identity at ratio 0, padded == solo, the SpeechLM route, the Hugging Face
route (reduced input embeddings == the LLM on the shortened prompt) and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speechtrim import reducers
from speechtrim.bench.sweep import all_methods, select_methods
from speechtrim.models.speechlm import SpeechLM
from speechtrim.ops.select import span_counts_to_remove, top_per_span
from speechtrim.reducers.pre_llm import PreLLMReducer, reduce_embeddings
from speechtrim.reducers.segment_topk import segment_quotas
from tests.tiny_models import AUDIO_TOKEN, audio_prompt, tiny_llama
from tests.tiny_speechlm import tiny_speechlm

PRE_LLM = [name for name in reducers.names() if reducers.REDUCERS.get(name).acts_on == "embeddings"]
LENGTHS = [37, 20, 3, 1]


def test_the_four_methods_are_registered_as_pre_llm():
    assert set(PRE_LLM) == {"pre_merge", "samp", "segment_topk", "ctc_compress"}
    assert all(issubclass(reducers.REDUCERS.get(name), PreLLMReducer) for name in PRE_LLM)


def embeddings(lengths: list[int], seed: int = 0, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded embeddings with runs of near-copies (something to merge), their mask, and CTC logits."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    embeds = torch.randn(len(lengths), longest, width, generator=generator)
    embeds[:, 5:12] = embeds[:, 5:6] + 0.01 * torch.randn(len(lengths), 7, width, generator=generator)
    mask = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    logits = torch.randn(len(lengths), longest, 9, generator=generator)
    return embeds, mask, logits


@pytest.mark.parametrize("name", PRE_LLM)
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_counts_depend_on_length_and_ratio_only_and_padded_rows_equal_solo_rows(name, ratio):
    reducer = reducers.build(name, ratio=ratio)
    embeds, mask, logits = embeddings(LENGTHS)
    out = reduce_embeddings(reducer, embeds, mask, logits)
    expected = [reducer.output_length(n) for n in LENGTHS]
    assert out.mask.sum(dim=1).tolist() == expected
    assert expected == [n - min(int(np.ceil(n * ratio - 0.5)), n - 1) for n in LENGTHS]  # at least one kept
    other, _, other_logits = embeddings(LENGTHS, seed=7)  # other content, same lengths: the same counts
    assert reduce_embeddings(reducer, other, mask, other_logits).mask.sum(dim=1).tolist() == expected
    for row, length in enumerate(LENGTHS):
        solo = reduce_embeddings(reducer, embeds[row : row + 1, :length], mask[row : row + 1, :length],
                                 logits[row : row + 1, :length])
        torch.testing.assert_close(solo.embeds[0], out.embeds[row, : expected[row]], rtol=0, atol=1e-6)
    if ratio == 0.0:
        assert torch.equal(out.embeds, embeds) and torch.equal(out.mask, mask)


def test_merges_average_runs_and_ctc_compress_merges_what_the_head_calls_one_label():
    embeds, mask, logits = embeddings([20])
    merged = reduce_embeddings(reducers.build("pre_merge", ratio=0.3), embeds, mask)  # 6 merges: inside the run
    run_mean = embeds[0, 5:12].mean(dim=0)
    assert any(torch.allclose(row, run_mean, atol=1e-5) for row in merged.embeds[0])
    labels = torch.full((1, 20, 9), -10.0)
    labels[0, :, 8] = 10.0  # blank everywhere ...
    labels[0, [2, 9, 15], 8], labels[0, [2, 9, 15], [1, 4, 6]] = -10.0, 10.0  # ... but three tokens
    out = reduce_embeddings(reducers.build("ctc_compress", ratio=0.5), embeds, mask, labels)
    kept = out.embeds[0, : out.mask[0].sum()]
    for token in (2, 9, 15):  # a token next to blanks is never averaged with them while blank pairs remain
        assert any(torch.allclose(row, embeds[0, token]) for row in kept), token


def test_segment_quotas_and_per_span_selection():
    quotas = segment_quotas(37, 19, 16)
    assert [size for size, _ in quotas] == [16, 16, 5] and sum(kept for _, kept in quotas) == 19
    assert all(0 <= kept <= size for size, kept in quotas)
    span_id = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, 1, 1]])
    counts = span_counts_to_remove(span_id, 0.5)
    assert counts.tolist() == [[1, 2]]
    chosen = top_per_span(torch.tensor([[9.0, 1, 3, 2, 9, 5, 4, 6, 1]]), span_id, counts)
    assert chosen.nonzero()[:, 1].tolist() == [2, 5, 7]


def test_pre_llm_options_are_checked_early():
    with pytest.raises(ValueError, match="has no layer"):
        reducers.build("pre_merge", ratio=0.3, layer=3)
    with pytest.raises(ValueError, match="schedule must be 'none'"):
        reducers.build("samp", ratio=0.3, schedule="constant")
    with pytest.raises(ValueError, match="threshold"):
        reducers.build("samp", ratio=0.3, threshold=2.0)
    with pytest.raises(ValueError, match="segment_tokens"):
        reducers.build("segment_topk", ratio=0.3, segment_tokens=0)
    with pytest.raises(ValueError, match="needs the decoder's shape"):
        reducers.build("pre_merge", flops_reduction=0.3).output_length(100)
    embeds, mask, _ = embeddings([20])
    with pytest.raises(ValueError, match="CTC logits over the LLM's vocabulary"):
        reduce_embeddings(reducers.build("ctc_compress", ratio=0.3), embeds, mask)


# ------------------------------------------------------------------------------------------ SpeechLM route
def clips(seconds: list[float]) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [(0.1 * rng.standard_normal(int(16000 * s))).astype(np.float32) for s in seconds]


@pytest.fixture(scope="module")
def speechlm() -> SpeechLM:
    return tiny_speechlm(seed=1)


@pytest.mark.parametrize("name", ["pre_merge", "samp", "segment_topk"])
def test_with_reducer_on_a_speechlm_shortens_the_prompt_before_the_llm(speechlm, name):
    audios, prompts = clips([1.0, 0.6]), ["the audio : <audio>"] * 2
    full = speechlm.prepare(audios, prompts)
    with reducers.build(name, ratio=0.0)(speechlm):
        same = speechlm.prepare(audios, prompts)
    assert torch.equal(same.inputs_embeds, full.inputs_embeds) and same.audio_spans == full.audio_spans
    reducer = reducers.build(name, ratio=0.4)
    with reducer(speechlm) as stats:
        batch = speechlm.prepare(audios, prompts)
        text = speechlm.generate(batch, max_new_tokens=3)
    assert speechlm.audio_reduction is None and len(text) == 2
    before = [end - start for (start, end), in full.audio_spans]
    after = [end - start for (start, end), in batch.audio_spans]
    assert after == [reducer.output_length(n) for n in before] and after[0] < before[0]
    assert stats.acts_on == "embeddings" and stats.layer == 0
    assert stats.removed_per_layer[0] == before[0] - after[0]
    assert set(stats.tokens_per_layer) == {int(full.attention_mask[0].sum()) - stats.removed_per_layer[0]}
    assert 0 < stats.flops_reduction < 1


def test_a_flops_target_on_a_speechlm_is_met_and_ctc_compress_needs_a_vocabulary_head(speechlm):
    with reducers.build("pre_merge", flops_reduction=0.3)(speechlm) as stats:
        speechlm.prepare(clips([1.0]), ["the audio : <audio>"])
    assert abs(stats.flops_reduction - 0.3) < 0.05
    with pytest.raises(ValueError, match="projector has none"):
        reducers.build("ctc_compress", ratio=0.3)(speechlm)
    with pytest.raises(ValueError, match="without audio_spans"):
        reducers.build("pre_merge", ratio=0.3)(speechlm, audio_spans=[[(0, 3)]])
    with reducers.build("pre_merge", ratio=0.3)(speechlm):
        with pytest.raises(ValueError, match="do not stack"):
            reducers.build("samp", ratio=0.3)(speechlm).__enter__()


def test_ctc_compress_runs_on_a_speechlm_with_a_vocabulary_projector():
    base = tiny_speechlm(seed=0)
    model = SpeechLM(base.encoder, base.feature_extractor, base.llm, base.tokenizer, projector="vocab",
                     projector_params={"vocab_ids": [3, 4, 5, 6, 8, 9], "hidden": 16, "prosody_rank": 0})
    audios, prompts = clips([1.0]), ["the audio : <audio>"]
    full = model.prepare(audios, prompts)
    reducer = reducers.build("ctc_compress", ratio=0.5)
    with reducer(model) as stats:
        batch = model.prepare(audios, prompts)
    (start, end), = full.audio_spans[0]
    assert batch.audio_spans[0][0][1] - batch.audio_spans[0][0][0] == reducer.output_length(end - start)
    assert stats.removed_per_layer[0] == (end - start) // 2


# ------------------------------------------------------------------------------------------ Hugging Face route
@pytest.mark.parametrize("name", ["pre_merge", "samp", "segment_topk"])
def test_on_a_hub_model_the_reduced_prompt_runs_like_the_shortened_prompt(name):
    """Reducing the decoder's input embeddings before layer 0 (compact positions) == reducing the audio
    embeddings and running the LLM on the shorter prompt, which is what a serving engine does."""
    llama = tiny_llama(seed=3)
    prompt = audio_prompt([24, 15], seed=4)  # left-padded, two rows
    reducer = reducers.build(name, ratio=0.4)
    with reducer(llama, audio_token_id=AUDIO_TOKEN) as stats:
        logits = llama(**prompt).logits[:, -1]
        tokens = llama.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, prompt["input_ids"].shape[1]:]
    embed = llama.get_input_embeddings()
    for row in range(2):
        real = prompt["attention_mask"][row].bool()
        ids = prompt["input_ids"][row][real]
        audio = ids == AUDIO_TOKEN
        start, end = int(audio.nonzero()[0]), int(audio.nonzero()[-1]) + 1
        vectors = embed(ids).detach()
        reduced = reduce_embeddings(reducer, vectors[start:end].unsqueeze(0), torch.ones(1, end - start, dtype=torch.bool))
        assert reduced.embeds.shape[1] == reducer.output_length(end - start)
        short = torch.cat([vectors[:start], reduced.embeds[0], vectors[end:]]).unsqueeze(0)
        with torch.no_grad():
            expected = llama(inputs_embeds=short).logits[:, -1]
            again = llama.generate(inputs_embeds=short, attention_mask=torch.ones(short.shape[:2], dtype=torch.long),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(logits[row : row + 1], expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(tokens[row : row + 1], again), row
    assert stats.layer == 0 and stats.removed_per_layer[0] == int(np.ceil(24 * 0.4 - 0.5))


def test_ctc_compress_and_a_layer_are_refused_on_a_hub_model():
    llama = tiny_llama(seed=3)
    with pytest.raises(ValueError, match="CTC logits"):
        reducers.build("ctc_compress", ratio=0.3)(llama, audio_token_id=AUDIO_TOKEN)


def test_the_sweep_runs_pre_llm_methods_before_layer_zero_and_drops_ctc_without_a_head():
    methods = {m.name: m for m in all_methods(3)}
    assert {"pre_merge", "samp", "segment_topk", "ctc_compress"} <= set(methods)
    assert methods["samp"].layer is None and methods["samp"].keyed_by == "flops"
    assert methods["samp"].build(0.3).flops_reduction == 0.3
    assert "ctc_compress" not in {m.name for m in select_methods(None, 3, ctc_head=False)}
    with pytest.raises(ValueError, match="CTC head"):
        select_methods(["ctc_compress"], 3, ctc_head=False)


def test_samp_reduces_long_spans_window_by_window_with_a_fixed_count():
    reducer = reducers.build("samp", ratio=0.5, window=8)
    embeds, mask, _ = embeddings(LENGTHS)
    out = reduce_embeddings(reducer, embeds, mask)
    assert reducer.output_length(37) == 37 - (4 * 4 + 2)  # windows 8, 8, 8, 8, 5 lose 4, 4, 4, 4, 2
    assert out.mask.sum(dim=1).tolist() == [reducer.output_length(n) for n in LENGTHS]
    with pytest.raises(ValueError, match="window"):
        reducers.build("samp", ratio=0.5, window=1)
