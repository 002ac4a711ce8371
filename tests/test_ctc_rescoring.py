"""Joint CTC/LLM decoding: the CTC head's likelihood of a hypothesis, and generate(..., ctc_weight=)."""

import itertools
import math

import numpy as np
import pytest
import torch

from speechtrim.models.speechlm import SpeechLM
from speechtrim.models.vocab_projector import ctc_log_likelihoods, ctc_token_ids
from tests.tiny_speechlm import tiny_speechlm


def brute_force(log_probs: torch.Tensor, target: list[int], blank: int) -> float:
    """log p(target) summed over every alignment path (collapse repeats, drop blanks)."""
    total = 0.0
    steps, symbols = log_probs.shape
    for path in itertools.product(range(symbols), repeat=steps):
        collapsed = [s for i, s in enumerate(path) if s != blank and (i == 0 or s != path[i - 1])]
        if collapsed == target:
            total += math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
    return math.log(total) if total > 0 else -math.inf


def test_the_ctc_likelihood_of_a_hypothesis_is_the_sum_over_its_alignments():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)  # 2 clips, 4 positions, K=2 tokens + blank (index 2)
    lengths = torch.tensor([4, 3])
    hypotheses = [[[0, 1], [1], [0, 0]], [[1, 0], None, []]]
    scores = ctc_log_likelihoods(logits, lengths, hypotheses, blank=2)
    assert scores.shape == (2, 3)
    for row, candidates in enumerate(hypotheses):
        log_probs = logits[row, : int(lengths[row])].log_softmax(-1)
        for index, target in enumerate(candidates):
            if not target:
                assert scores[row, index] == -math.inf
                continue
            assert float(scores[row, index]) == pytest.approx(brute_force(log_probs, target, 2) / len(target),
                                                              rel=1e-5)
    # a hypothesis needing more positions than the clip has cannot be emitted
    assert ctc_log_likelihoods(logits, torch.tensor([1, 1]), [[[0, 1]], [[1]]], blank=2)[0, 0] == -math.inf


def vocab_model() -> SpeechLM:
    base = tiny_speechlm(seed=0)
    torch.manual_seed(1)
    return SpeechLM(base.encoder, base.feature_extractor, base.llm, base.tokenizer, projector="vocab",
                    projector_params={"vocab_ids": list(range(3, 19)), "hidden": 16, "prosody_rank": 0})


def clips(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


def test_ctc_rescoring_picks_among_the_llms_own_beams_by_the_joint_score():
    model = vocab_model()
    batch = model.prepare(clips(1.0, 0.6), ["transcribe this : <audio> \n"] * 2)
    logits, lengths = batch.extra["ctc_logits"], batch.extra["ctc_lengths"]
    assert logits.shape[:2] == (2, 50) and lengths.tolist() == [50, 30]  # one CTC position per audio token
    beams = 4
    output = model.llm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                max_new_tokens=5, do_sample=False, num_beams=beams, num_return_sequences=beams,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    texts = [t.strip() for t in model.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
    llm = output.sequences_scores.view(2, beams)
    index = {token: i for i, token in enumerate(range(3, 19))}
    for weight in (0.3, 1.0):
        picked = model.generate(batch, max_new_tokens=5, num_beams=beams, ctc_weight=weight)
        for row in range(2):
            hyps = texts[row * beams:(row + 1) * beams]
            assert picked[row] in hyps  # always text the LLM generated
            spelled = [[index.get(i) for i in ctc_token_ids(model.tokenizer, h)] for h in hyps]
            spelled = [s if s and None not in s else None for s in spelled]
            ctc = ctc_log_likelihoods(logits[row:row + 1], lengths[row:row + 1], [spelled], model.projector.blank)[0]
            joint = (1 - weight) * llm[row] + weight * ctc
            expected = hyps[int(joint.argmax())] if torch.isfinite(ctc).any() else hyps[int(llm[row].argmax())]
            assert picked[row] == expected
    assert model.generate(batch, max_new_tokens=5, num_beams=beams, ctc_weight=0.0) == [
        texts[0], texts[beams]]  # weight 0: the LLM's best beam


def test_ctc_rescoring_refuses_what_it_cannot_run():
    model = vocab_model()
    batch = model.prepare(clips(0.5), ["transcribe this : <audio> \n"])
    with pytest.raises(ValueError, match="num_beams >= 2"):
        model.generate(batch, max_new_tokens=2, ctc_weight=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        model.generate(batch, max_new_tokens=2, num_beams=2, ctc_weight=1.5)
    linear = tiny_speechlm(seed=0)
    plain = linear.prepare(clips(0.5), ["transcribe this : <audio> \n"])
    assert "ctc_logits" not in plain.extra
    with pytest.raises(ValueError, match="CTC head"):
        linear.generate(plain, max_new_tokens=2, num_beams=2, ctc_weight=0.5)


def test_evaluate_embedded_defaults_are_the_recipes():
    import argparse

    from speechtrim.cli import _build_parser
    from speechtrim.train.embedded import EmbeddedRecipe

    args = _build_parser().parse_args(["evaluate-embedded"])
    assert isinstance(args, argparse.Namespace)
    assert (args.beams, args.ctc_weight) == (EmbeddedRecipe.eval_beams, EmbeddedRecipe.eval_ctc_weight)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bench_scores_the_beam_search_with_the_same_reducer_and_keys_rows_by_the_decoding(one_thread, tmp_path,
                                                                                           batch_size):
    """``bench --beams N --ctc-weight w``: each ASR row's outputs are what ``rescored_generate`` gives on the same
    (reduced) inputs of each clip alone, computed here independently, also when the clips of a batch (of unequal
    lengths) are searched together; greedy rows keep their keys, beam rows get others; label rows are read by
    scoring and do not depend on the decoding; the tables say how the outputs were decoded."""
    from speechtrim.bench.report import markdown_tables
    from speechtrim.bench.runner import EmbeddedModel
    from speechtrim.bench.sweep import SweepConfig, row_key, run_sweep, select_methods
    from speechtrim.eval.harness import EvalItem, EvalSet
    from speechtrim.models.joint_decoding import Decoding, rescored_generate

    model = EmbeddedModel(vocab_model(), "tiny-vocab", trained=False)
    audio = clips(1.0, 0.7, 1.3)
    asr = EvalSet("toy-asr", "asr", [EvalItem(f"a{i}", a, "the emotion is happy", "transcribe this : <audio> \n")
                                     for i, a in enumerate(audio)])
    emotion = EvalSet("toy-emotion", "emotion", [EvalItem(f"e{i}", a, "sad", "what emotion <audio> \n",
                                                          "the emotion is :") for i, a in enumerate(audio)],
                      ("happy", "sad"))
    decoding = Decoding(3, 0.5)
    methods = select_methods(["fastv", "fastadasp-sparse", "pre_merge"], 1)
    config = SweepConfig(targets=(0.3,), methods=methods, max_new_tokens=4, decoding=decoding, batch_size=batch_size)
    rows = run_sweep(model, [asr, emotion], config, tmp_path / "rows.jsonl", progress=False)
    by = {(row["method"], row["task"]): row for row in rows}

    for method in methods:  # the oracle: the reducer attached (or applied to the audio) by hand, then the search
        expected = []
        for item in asr.items:
            prepared = model.prepare(item)
            reducer = method.build(0.3)
            if reducer is None:
                inputs, context = prepared, torch.no_grad()
            elif reducer.acts_on == "embeddings":
                inputs, context = prepared.reduce_audio(reducer)[0], torch.no_grad()
            else:
                inputs, context = prepared, reducer(model.decoder, audio_spans=prepared.audio_spans)
            with context:
                expected += rescored_generate(model.decoder, model.tokenizer, model.speechlm.projector,
                                              inputs.kwargs["inputs_embeds"], inputs.kwargs["attention_mask"],
                                              *prepared.ctc, 4, 0.5, num_beams=3)
        row = by[method.name, "asr"]
        assert row["outputs"] == expected, method.name
        assert row["decoding"] == {"num_beams": 3, "ctc_weight": 0.5} and row["search_ms"] > 0
    assert by["none", "emotion"]["decoding"] == {"num_beams": 1, "ctc_weight": 0.0}
    assert "search_ms" not in by["none", "emotion"]

    import dataclasses

    from speechtrim.bench.sweep import data_fingerprint

    greedy = SweepConfig(targets=(0.3,), methods=methods, max_new_tokens=4, batch_size=batch_size)
    none = methods[0]
    asr_keys = [row_key(model.fingerprint, data_fingerprint(asr), none, 0.0, c) for c in (config, greedy)]
    assert by["none", "asr"]["key"] == asr_keys[0] != asr_keys[1]  # greedy keys are those of before: no "decoding"
    label = [dataclasses.replace(c, max_new_tokens=4, decoding=Decoding()) for c in (config, greedy)]
    assert by["none", "emotion"]["key"] == row_key(model.fingerprint, data_fingerprint(emotion), none, 0.0, label[0])
    tables = markdown_tables(rows, model.name)
    assert "beam search, 3 beams, the CTC head weighted 0.5" in tables


def test_bench_refuses_decoding_it_cannot_run_before_loading_anything(tmp_path):
    from speechtrim.bench.main import BenchOptions, run_bench

    for options, message in (
        (BenchOptions(beams=0, out=tmp_path), "beams must be an int >= 1"),
        (BenchOptions(beams=1, ctc_weight=0.5, out=tmp_path), "use 2 or more beams"),
        (BenchOptions(beams=4, ctc_weight=1.5, out=tmp_path), "in [0, 1]"),
        (BenchOptions(beams=4, scaling=True, out=tmp_path), "drop --beams"),
    ):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            run_bench(options, model=object())  # would fail on first use: the check comes first


def test_bench_refuses_a_ctc_weight_for_a_model_without_a_ctc_head(one_thread, tmp_path):
    from speechtrim.bench.main import BenchOptions, run_bench
    from speechtrim.bench.runner import EmbeddedModel

    model = EmbeddedModel(tiny_speechlm(seed=0), "tiny-linear", trained=False)
    import json

    import soundfile

    manifest = tmp_path / "clips.jsonl"
    soundfile.write(tmp_path / "a.wav", clips(0.8)[0], 16000)
    manifest.write_text(json.dumps({"audio": "a.wav", "transcript": "the emotion is sad"}) + "\n")
    with pytest.raises(ValueError, match="does not have"):
        run_bench(BenchOptions(data=[str(manifest)], beams=2, ctc_weight=0.5, out=tmp_path / "out"), model=model)
    assert not (tmp_path / "out" / "results.jsonl").exists()
