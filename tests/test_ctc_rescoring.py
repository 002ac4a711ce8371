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
