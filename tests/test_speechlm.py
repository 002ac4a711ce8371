"""speechtrim's SpeechLM on tiny random parts: splicing, padding, frozen parts, scoring, bad input."""

import numpy as np
import pytest
import torch

from speechtrim.models.speechlm import SpeechLM
from tests.tiny_speechlm import tiny_speechlm

PROMPT = "what the emotion : <audio> \n"


def clips(*seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]


def test_encode_keeps_only_valid_frames():
    model = tiny_speechlm()
    frames, mask = model.encode(clips(1.0, 0.5))
    assert frames.shape == (2, 50, 32)
    assert mask.sum(dim=1).tolist() == [50, 25]


def test_audio_spans_hold_the_projected_audio():
    model = tiny_speechlm(adapter="concat")
    audio = clips(0.4, 1.0)
    frames, mask = model.encode(audio)
    embeds, embeds_mask = model.embed_audio(frames, mask)
    batch = model.build_inputs([PROMPT, PROMPT], embeds, embeds_mask)
    for row in range(2):
        (start, end), = batch.audio_spans[row]
        assert end - start == model.adapter.output_length(int(mask[row].sum())) == int(embeds_mask[row].sum())
        torch.testing.assert_close(batch.inputs_embeds[row, start:end], embeds[row, embeds_mask[row]])
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[1].all()  # shorter row is left-padded


@pytest.mark.parametrize("adapter", ["none", "mean", "conv", "attn_q_mean"])
def test_padded_row_scores_like_the_row_alone(adapter):
    model = tiny_speechlm(adapter=adapter)
    audio = clips(0.3, 1.2)
    candidates = ["angry", "happy sad", "very very neutral"]
    together = model.score(model.prepare(audio, [PROMPT, PROMPT]), candidates)
    for row in range(2):
        alone = model.score(model.prepare([audio[row]], [PROMPT]), candidates)
        torch.testing.assert_close(together[row], alone[0], rtol=1e-4, atol=1e-4)


def test_multi_token_score_equals_full_sequence_log_probability():
    model = tiny_speechlm()
    audio = clips(0.6)
    batch = model.prepare(audio, [PROMPT], targets=["very neutral"])
    ids = batch.extra["target_ids"][0][:-1]  # drop the eos the target gets
    logits = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits[0]
    start = batch.extra["target_spans"][0][0]
    log_probs = torch.log_softmax(logits[start - 1 : start - 1 + len(ids)], dim=-1)
    expected = log_probs.gather(1, ids.unsqueeze(1)).sum()
    scored = model.score(model.prepare(audio, [PROMPT]), ["very neutral"])
    torch.testing.assert_close(scored[0, 0], expected, rtol=1e-4, atol=1e-4)



def test_loss_equals_cross_entropy_over_full_logits_in_a_padded_batch():
    model = tiny_speechlm()
    batch = model.prepare(clips(0.4, 1.0), [PROMPT, PROMPT], targets=["happy", "very very neutral"])
    logits = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits  # every position
    total, count = 0.0, 0
    for row, ((start, end), ids) in enumerate(zip(batch.extra["target_spans"], batch.extra["target_ids"])):
        total = total + torch.nn.functional.cross_entropy(logits[row, start - 1 : end - 1], ids, reduction="sum")
        count += len(ids)
    assert batch.extra["target_spans"][0][0] != batch.extra["target_spans"][1][0]  # unequal targets
    torch.testing.assert_close(model.loss(batch), total / count, rtol=1e-5, atol=1e-5)

def test_only_projector_and_adapter_train():
    model = tiny_speechlm(adapter="attn_mean").train()
    assert not model.encoder.training and not model.llm.training
    batch = model.prepare(clips(0.5, 0.8), [PROMPT, PROMPT], targets=["happy", "sad"])
    model.loss(batch).backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("projector.", "adapter.")) for name in trainable)
    for name, parameter in model.named_parameters():
        if name.startswith(("encoder.", "llm.")):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_generate_returns_text_per_row():
    model = tiny_speechlm()
    texts = model.generate(model.prepare(clips(0.5, 0.9), [PROMPT, PROMPT]), max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)


def test_frame_pooling_halves_the_audio_tokens():
    model = tiny_speechlm()
    pooled = SpeechLM(model.encoder, model.feature_extractor, model.llm, model.tokenizer, pool=2)
    frames, mask = pooled.encode(clips(1.0, 0.3))
    embeds, embeds_mask = pooled.embed_audio(frames, mask)
    assert embeds_mask.sum(dim=1).tolist() == [25, 8]


def test_bad_input_is_refused_with_a_clear_message():
    model = tiny_speechlm()
    with pytest.raises(ValueError, match="30 s window"):
        model.encode(clips(31.0))
    with pytest.raises(ValueError, match="exactly one"):
        model.prepare(clips(0.5), ["no marker here"])
    with pytest.raises(ValueError, match="pool"):
        SpeechLM(model.encoder, model.feature_extractor, model.llm, model.tokenizer, pool=0)


def test_saved_projector_and_adapter_reload_with_one_call(tmp_path, monkeypatch):
    import speechtrim.models.storage as speechlm_module

    def tiny_build(encoder, llm, adapter, adapter_params=None, pool=1, seed=0, projector="linear",
                   projector_params=None):
        assert projector == "linear" and not projector_params
        model = tiny_speechlm(adapter=adapter, seed=seed + 7, **(adapter_params or {}))
        model.speech_config.encoder, model.speech_config.llm = encoder, llm
        return model

    monkeypatch.setattr(speechlm_module, "build_speechlm", tiny_build)
    trained = tiny_build("tiny", "tiny", "conv")
    with torch.no_grad():
        for parameter in list(trained.projector.parameters()) + list(trained.adapter.parameters()):
            parameter.add_(torch.randn_like(parameter))
    speechlm_module.save_trained(trained, tmp_path / "saved", {"task": "emotion"})
    loaded = speechlm_module.load_speechlm(tmp_path / "saved")
    assert loaded.speech_config.extra["task"] == "emotion" and loaded.speech_config.adapter == "conv"
    for name, tensor in trained.state_dict().items():
        if name.startswith(("projector.", "adapter.")):
            assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(FileNotFoundError, match="not a saved SpeechLM"):
        speechlm_module.load_speechlm(tmp_path)



def test_a_vocabulary_projector_with_context_layers_reloads_with_the_same_outputs(tmp_path, monkeypatch):
    import speechtrim.models.storage as speechlm_module
    from speechtrim.models.vocab_projector import VocabProjector

    def tiny_build(encoder, llm, adapter, adapter_params=None, pool=1, seed=0, projector="linear",
                   projector_params=None):
        model = tiny_speechlm(seed=seed + 3)
        if projector == "vocab":
            model.projector = VocabProjector(32, 48, **projector_params)
        model.speech_config.encoder, model.speech_config.llm = encoder, llm
        return model

    monkeypatch.setattr(speechlm_module, "build_speechlm", tiny_build)
    trained = tiny_build("tiny", "tiny", "none")
    params = {"hidden": 16, "prosody_rank": 4, "context_layers": 1, "context_heads": 4, "context_width": 8}
    torch.manual_seed(1)
    trained.use_projector(VocabProjector(32, 48, [3, 4, 5, 6], **params), "vocab", params)
    with torch.no_grad():
        for parameter in trained.projector.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    speechlm_module.save_trained(trained, tmp_path / "saved", {"task": "asr"})
    loaded = speechlm_module.load_speechlm(tmp_path / "saved").eval()
    assert loaded.projector.context is not None and len(loaded.projector.context["layers"].layers) == 1
    frames, mask = trained.encode(clips(1.0, 0.4))
    expected, expected_mask, expected_logits = trained.eval().project(frames, mask)
    got, got_mask, got_logits = loaded.project(frames, mask)
    assert torch.equal(got_mask, expected_mask)
    torch.testing.assert_close(got_logits, expected_logits)
    torch.testing.assert_close(got, expected)
