"""The parts that teach the embedded model to hear: vocabulary projector, CTC, packing, LoRA, the two stages."""

import numpy as np
import pytest
import torch

from speechtrim.models.vocab_projector import VocabProjector, ctc_greedy, ctc_loss
from speechtrim.train.hearing import StageConfig, ctc_stage, ctc_text, joint_stage
from speechtrim.train.packing import FRAME_SAMPLES, pack_windows
from speechtrim.train.trainer import TrainItem
from tests.tiny_speechlm import WORDS, tiny_speechlm

VOCAB = [WORDS.index(word) for word in ("the", "audio", "is", "happy", "sad")]


def vocab_model(seed: int = 0, prosody_rank: int = 4, projector_seed: int = 0):
    model = tiny_speechlm(seed=seed)
    torch.manual_seed(projector_seed)
    model.projector = VocabProjector(32, 48, VOCAB, hidden=16, prosody_rank=prosody_rank)
    return model


def test_projector_mixes_llm_embeddings_by_its_ctc_posteriors():
    model = vocab_model(prosody_rank=4)
    embeddings = model.llm.get_input_embeddings().weight
    frames = torch.randn(2, 5, 32)
    mixed, logits = model.projector(frames, embeddings)
    assert mixed.shape == (2, 5, 48) and logits.shape == (2, 5, len(VOCAB) + 1)
    values = torch.cat([embeddings[VOCAB], model.projector.blank_embedding.unsqueeze(0)])
    # the prosody path starts at zero, so the output is exactly the posterior mix
    torch.testing.assert_close(mixed, torch.softmax(logits, -1) @ values)
    # and the logits are dot products against the LLM's own embeddings of the vocabulary
    hidden = model.projector.mlp(frames)
    torch.testing.assert_close(logits[..., :-1], hidden @ embeddings[VOCAB].T)


def test_context_layers_see_a_clips_own_frames_only_and_train_with_the_ctc_head():
    torch.manual_seed(0)
    projector = VocabProjector(32, 48, VOCAB, hidden=16, prosody_rank=0, context_layers=2, context_heads=4,
                               context_width=16).eval()
    embeddings = torch.randn(len(WORDS), 48)
    clip = torch.randn(1, 5, 32)
    # it starts as the frame-wise MLP exactly (the way back from the context is zero), then is given weights
    torch.testing.assert_close(projector.logits(clip, embeddings)[0, :, :-1], projector.mlp(clip)[0] @ embeddings[VOCAB].T)
    with torch.no_grad():
        projector.context["out"].weight.normal_()
    alone = projector.logits(clip, embeddings, torch.ones(1, 5, dtype=torch.bool))
    # the same clip in a padded batch beside a longer one: its valid positions get the same logits
    batch = torch.zeros(2, 9, 32)
    batch[0, :5], batch[1] = clip[0], torch.randn(9, 32)
    mask = torch.arange(9).unsqueeze(0) < torch.tensor([[5], [9]])
    torch.testing.assert_close(projector.logits(batch, embeddings, mask)[0, :5], alone[0])
    # without the mask the padding leaks into the clip's context: the mask is what keeps it out
    assert not torch.allclose(projector.logits(batch, embeddings)[0, :5], alone[0], atol=1e-4)
    # the context differs from the frame-wise MLP, and the CTC loss reaches its parameters
    assert not torch.allclose(alone[0, :, :-1], projector.mlp(clip)[0] @ embeddings[VOCAB].T, atol=1e-4)
    projector.train()
    loss = ctc_loss(projector.logits(batch, embeddings, mask), mask.sum(dim=1),
                    [torch.tensor([0, 1]), torch.tensor([2, 3, 4])], projector.blank)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.context.parameters())
    with pytest.raises(ValueError, match="context_heads"):
        VocabProjector(32, 48, VOCAB, context_layers=1, context_heads=5, context_width=16)
    with pytest.raises(ValueError, match="context_layers"):
        VocabProjector(32, 48, VOCAB, context_layers=-1)


def test_projector_refuses_a_bad_vocabulary():
    with pytest.raises(ValueError, match="distinct token ids"):
        VocabProjector(8, 8, [1, 1, 2])
    with pytest.raises(ValueError, match="distinct token ids"):
        VocabProjector(8, 8, [])


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    blank = 3
    path = torch.tensor([[0, 0, 3, 0, 1, 1, 3, 2, 2]])
    logits = torch.nn.functional.one_hot(path, 4).float()
    ids = ctc_greedy(logits, torch.tensor([9]), torch.tensor([10, 11, 12]), blank)
    assert ids == [[10, 10, 11, 12]]
    # a shorter valid length cuts the path
    assert ctc_greedy(logits, torch.tensor([4]), torch.tensor([10, 11, 12]), blank) == [[10, 10]]


def test_ctc_loss_is_low_for_the_right_path_and_high_for_another():
    blank = 3
    path = torch.tensor([[0, 3, 1, 1, 3, 2]])
    logits = torch.nn.functional.one_hot(path, 4).float() * 20
    right = ctc_loss(logits, torch.tensor([6]), [torch.tensor([0, 1, 2])], blank)
    wrong = ctc_loss(logits, torch.tensor([6]), [torch.tensor([2, 1, 0])], blank)
    assert right < 1e-3 < 1.0 < wrong


def test_ctc_text_keeps_words_and_apostrophes_only():
    assert ctc_text("Don't PANIC, it's  42 o'clock!") == "don't panic it's o'clock"


def test_pack_windows_places_clips_on_the_frame_grid_without_overlap():
    lengths = [16000 * 4, 16000 * 3 + 17, 16000 * 20, 16000 * 9, 100]
    windows = pack_windows(lengths, gap=16000)
    placed = sorted(index for window in windows for index, _ in window)
    assert placed == list(range(len(lengths)))
    for window in windows:
        end = -1
        for index, start in window:
            assert start % FRAME_SAMPLES == 0 and start > end and start + lengths[index] <= 30 * 16000
            end = start + lengths[index] + 16000 - 1
    assert windows[0][0] == (0, 0)
    with pytest.raises(ValueError, match="longer than"):
        pack_windows([16000 * 31], gap=0)


def test_packed_frames_of_a_lone_clip_equal_solo_encoding(tmp_path):
    import soundfile

    from speechtrim.train.encoder_cache import EncoderCache
    from speechtrim.train.packing import encode_packed

    model = vocab_model()
    rng = np.random.default_rng(0)
    path = tmp_path / "a.wav"
    soundfile.write(path, (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000, subtype="FLOAT")
    frames = encode_packed(model, [path], EncoderCache(model, "tiny-packed", folder=tmp_path), progress=False)[0]
    solo, mask = model.encode([soundfile.read(path, dtype="float32")[0]])
    assert frames.shape == (int(mask.sum()), 32)
    torch.testing.assert_close(frames, solo[0, mask[0]], atol=2e-3, rtol=1e-2)  # cached as float16


def _examples(model, count: int = 6):
    torch.manual_seed(1)
    prompt = "transcribe this <audio>"
    examples = []
    for row in range(count):
        word = ["happy", "sad"][row % 2]
        target = torch.tensor([VOCAB.index(WORDS.index("the")), VOCAB.index(WORDS.index(word))])
        frames = torch.randn(12, 32) + (2.0 if word == "happy" else -2.0)
        examples.append(TrainItem(frames, prompt, f"the {word}", "", target))
    return examples


def test_the_ctc_stage_lowers_the_ctc_loss_and_resumes_identically(tmp_path):
    config = StageConfig(steps=8, batch_size=3, lr=1e-2, warmup=2, checkpoint_every=4)
    model = vocab_model()
    history = ctc_stage(model, _examples(model), config, checkpoint=tmp_path / "a.ckpt", progress=False)
    assert [row["step"] for row in history] == [4, 8] and history[-1]["ctc"] < history[0]["ctc"]
    # a second run interrupted after step 5 (Ctrl-C), then resumed from its checkpoint, ends with the same weights
    interrupted = StageConfig(**{**config.__dict__, "evaluate_every": 5})
    calls = []

    def interrupt() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {}

    half = vocab_model()
    with pytest.raises(KeyboardInterrupt):
        ctc_stage(half, _examples(half), interrupted, checkpoint=tmp_path / "b.ckpt", evaluate=interrupt,
                  progress=False)
    state = torch.load(tmp_path / "b.ckpt", weights_only=False)
    assert state["step"] == 5
    state["config"] = config.__dict__  # the evaluation period does not change the weights
    torch.save(state, tmp_path / "b.ckpt")
    resumed = vocab_model(projector_seed=5)  # other initial weights: the checkpoint must overwrite them
    ctc_stage(resumed, _examples(resumed), config, checkpoint=tmp_path / "b.ckpt", progress=False)
    for (name, a), (_, b) in zip(model.projector.state_dict().items(), resumed.projector.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    model = vocab_model()
    ctc_stage(model, _examples(model), StageConfig(steps=2, batch_size=2, lr=1e-3, warmup=1), checkpoint=tmp_path / "c",
              progress=False)
    with pytest.raises(ValueError, match="other settings"):
        ctc_stage(model, _examples(model), StageConfig(steps=2, batch_size=2, lr=2e-3, warmup=1),
                  checkpoint=tmp_path / "c", progress=False)


def test_the_joint_stage_trains_lora_and_projector_and_merging_keeps_the_outputs():
    model = vocab_model()
    model.add_lora(rank=2, alpha=4)
    assert model.has_lora
    lora_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_B" in n}
    frozen_before = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    history = joint_stage(model, _examples(model), StageConfig(steps=4, batch_size=3, lr=1e-2, lora_lr=1e-2,
                                                                warmup=1, checkpoint_every=2), progress=False)
    assert {"lm", "ctc", "loss"} <= set(history[-1])
    after = dict(model.llm.named_parameters())
    assert any(not torch.equal(lora_before[n], after[n]) for n in lora_before)
    assert all(torch.equal(frozen_before[n], after[n]) for n in frozen_before)
    frames, mask = torch.randn(2, 12, 32), torch.ones(2, 12, dtype=torch.bool)
    embeds, embeds_mask = model.embed_audio(frames, mask)
    batch = model.build_inputs(["transcribe this <audio>"] * 2, embeds, embeds_mask)
    with torch.no_grad():
        unmerged = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
        model.merge_lora()
        merged = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
    assert not model.has_lora and type(model.llm).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_ctc_logits_need_a_ctc_head():
    with pytest.raises(ValueError, match="no CTC head"):
        tiny_speechlm().ctc_logits([np.zeros(1600, dtype=np.float32)])
    logits, lengths = vocab_model().ctc_logits([np.zeros(16000, dtype=np.float32)])
    assert logits.shape[-1] == len(VOCAB) + 1 and lengths.tolist() == [50]


def test_time_masking_zeroes_about_the_asked_share_of_valid_frames_only():
    from speechtrim.train.hearing import time_masked

    frames = torch.ones(2, 100, 3)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[0, :100] = True
    mask[1, :40] = True
    masked = time_masked(frames, mask, 0.2, torch.Generator().manual_seed(0))
    zeroed = (masked[..., 0] == 0).float().sum(dim=1)
    assert 5 <= zeroed[0] <= 20 and zeroed[1] <= 10 and bool((masked[1, 40:] == 1).all())
    again = time_masked(frames, mask, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(masked, again) and torch.equal(time_masked(frames, mask, 0.0, None), frames)


def test_feature_dropout_zeroes_about_the_asked_share_and_keeps_the_mean():
    from speechtrim.train.hearing import StageConfig, feature_dropped

    frames = torch.ones(4, 50, 64)
    dropped = feature_dropped(frames, 0.25, torch.Generator().manual_seed(0))
    share = float((dropped == 0).float().mean())
    assert 0.22 < share < 0.28 and torch.allclose(dropped[dropped != 0], torch.tensor(1 / 0.75))
    assert abs(float(dropped.mean()) - 1.0) < 0.05
    assert torch.equal(dropped, feature_dropped(frames, 0.25, torch.Generator().manual_seed(0)))  # seeded
    assert torch.equal(feature_dropped(frames, 0.0, None), frames)
    with pytest.raises(ValueError, match="feature_dropout must be in"):
        StageConfig(steps=1, batch_size=1, lr=1e-3, feature_dropout=1.0)


def test_sigterm_during_a_stage_saves_the_checkpoint(tmp_path):
    import os
    import signal

    config = StageConfig(steps=6, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=6, evaluate_every=3)

    def terminate() -> dict:
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    model = vocab_model()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        ctc_stage(model, _examples(model), config, checkpoint=tmp_path / "t.ckpt", evaluate=terminate, progress=False)
    assert torch.load(tmp_path / "t.ckpt", weights_only=False)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # the stage's handler is gone again


def test_ctc_transcribe_decodes_the_heads_best_path():
    model = vocab_model()
    audio = [np.zeros(16000, dtype=np.float32), np.zeros(8000, dtype=np.float32)]
    texts = model.ctc_transcribe(audio)
    logits, lengths = model.ctc_logits(audio)
    ids = ctc_greedy(logits, lengths, model.projector.vocab_ids, model.projector.blank)
    assert texts == [model.tokenizer.decode(row).strip() for row in ids] and len(texts) == 2


def test_row_mean_loss_weighs_a_short_answer_like_a_long_one():
    model = vocab_model()
    frames, mask = torch.randn(2, 12, 32), torch.ones(2, 12, dtype=torch.bool)
    embeds, embeds_mask = model.embed_audio(frames, mask)
    batch = model.build_inputs(["transcribe this <audio>"] * 2, embeds, embeds_mask,
                               targets=["the audio is happy the audio is sad", "sad"])
    with torch.no_grad():
        tokens, rows = model.loss(batch), model.loss(batch, reduction="rows")
        alone = [model.loss(model.build_inputs(["transcribe this <audio>"], embeds[i : i + 1], embeds_mask[i : i + 1],
                                               targets=[text])) for i, text in enumerate(["the audio is happy the "
                                                                                          "audio is sad", "sad"])]
    torch.testing.assert_close(rows, (alone[0] + alone[1]) / 2)  # each row's token mean, then the mean of rows
    long_tokens = len(batch.extra["target_ids"][0])
    short_tokens = len(batch.extra["target_ids"][1])
    expected = (alone[0] * long_tokens + alone[1] * short_tokens) / (long_tokens + short_tokens)
    torch.testing.assert_close(tokens, expected)  # the token mean weighs the long row by its length
    with pytest.raises(ValueError, match="reduction"):
        model.loss(batch, reduction="sum")


def test_the_prosody_path_gets_its_own_learning_rate():
    model = vocab_model(prosody_rank=4)
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    joint_stage(model, _examples(model), StageConfig(steps=2, batch_size=3, lr=1e-9, prosody_lr=1e-2, warmup=1,
                                                      lm_reduction="rows", checkpoint_every=2), progress=False)
    after = dict(model.projector.named_parameters())
    moved = {n: float((after[n] - before[n]).abs().max()) for n in before}
    assert moved["prosody.1.weight"] > 1e-4  # starts at zero, moves at its own rate
    assert moved["mlp.0.weight"] < 1e-6  # the rest of the projector barely moves at lr 1e-9
    with pytest.raises(ValueError, match="prosody_lr"):
        StageConfig(steps=1, batch_size=1, lr=1e-3, prosody_lr=0.0)
    with pytest.raises(ValueError, match="lm_reduction"):
        StageConfig(steps=1, batch_size=1, lr=1e-3, lm_reduction="sum")


def _byte_level_tokenizer():
    """A small byte-level BPE (SmolLM2's kind: "Ġ" marks a leading space), trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = ["the weather will be cold and windy", "the children are playing in the park", "the weather is fine"] * 5
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_ctc_speller_spells_words_in_short_llm_tokens_and_keeps_the_whole_ones():
    from speechtrim.train.hearing import ctc_speller, ctc_token_ids

    tokenizer = _byte_level_tokenizer()
    sentence = "The weather, in the PARK!"
    assert ctc_speller(tokenizer)(sentence) == ctc_token_ids(tokenizer, sentence)
    own = ctc_token_ids(tokenizer, sentence)
    assert any(len(piece) > 3 for piece in tokenizer.convert_ids_to_tokens(own))  # " weather" is one long token
    spelled = ctc_speller(tokenizer, 3)(sentence)
    pieces = tokenizer.convert_ids_to_tokens(spelled)
    assert all(len(piece) <= 3 for piece in pieces) and len(spelled) > len(own)
    assert tokenizer.decode(spelled) == " " + ctc_text(sentence)  # the same text, finer
    vocabulary = tokenizer.get_vocab()
    first = pieces[0]  # longest first: no vocabulary entry of <= 3 characters extends it within " the"
    assert "Ġthe".startswith(first) and all(
        "Ġthe"[:n] not in vocabulary for n in range(len(first) + 1, 4))
    # a word whose own tokens are all "whole" keeps them; the others are still spelled
    the = ctc_token_ids(tokenizer, "the")
    kept = ctc_speller(tokenizer, 3, whole=the)(sentence)
    assert kept[: len(the)] == the and tokenizer.decode(kept) == " " + ctc_text(sentence)
    assert all(len(piece) <= 3 for piece in tokenizer.convert_ids_to_tokens(kept[len(the):]) if piece != "Ġthe")
    with pytest.raises(ValueError, match="max_piece must be None"):
        ctc_speller(tokenizer, 0)


def test_bfloat16_stages_run_under_autocast_and_keep_float32_weights():
    from speechtrim.train.hearing import _lm_loss

    model = vocab_model()
    model.add_lora(rank=2, alpha=4)
    config = StageConfig(steps=4, batch_size=3, lr=1e-2, lora_lr=1e-2, warmup=1, checkpoint_every=2,
                         ctc_weight=1.0, precision="bfloat16")
    seen = []
    inner = _lm_loss(model, config, with_summary=False)

    def loss_fn(batch, step):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return inner(batch, step)

    from speechtrim.train.hearing import _run_stage

    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}]
    history = _run_stage("joint", model, _examples(model), config, loss_fn, params, None, None, False)
    assert seen == [(True, torch.bfloat16)] * 4 and torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the stage
    # float32 stages run as before: no autocast
    seen.clear()
    _run_stage("joint", model, _examples(model), StageConfig(steps=1, batch_size=3, lr=1e-2, warmup=1),
               loss_fn, params, None, None, False)
    assert seen == [(False, torch.get_autocast_dtype("cpu"))]


def test_frozen_llm_matrices_are_cast_once_for_a_bfloat16_stage_and_float32_for_evaluation():
    from speechtrim.precision import FrozenWeights, compute_precision
    from speechtrim.train.hearing import _lm_loss, _run_stage

    model = vocab_model()
    model.add_lora(rank=2, alpha=4)
    config = StageConfig(steps=4, batch_size=3, lr=1e-2, lora_lr=1e-2, warmup=1, checkpoint_every=2,
                         evaluate_every=2, ctc_weight=1.0, precision="bfloat16")
    embeddings = model.llm.get_input_embeddings().weight
    frozen = [p for p in model.llm.parameters() if p.dim() == 2 and not p.requires_grad and p is not embeddings]
    assert frozen
    inner = _lm_loss(model, config, with_summary=False)
    in_steps, in_evaluation = set(), set()

    def loss_fn(batch, step):
        in_steps.update(p.dtype for p in frozen)
        assert embeddings.dtype == torch.float32  # the projector scores against the float32 embeddings
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        return inner(batch, step)

    def evaluate():
        in_evaluation.update(p.dtype for p in frozen)
        return {}

    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2}]
    _run_stage("joint", model, _examples(model), config, loss_fn, params, None, evaluate, False)
    assert in_steps == {torch.bfloat16} and in_evaluation == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # restored after the stage

    # the same products as autocast's own casts, so the same loss
    batch = _examples(model)[:3]
    with torch.no_grad(), compute_precision("bfloat16"):
        plain = inner(batch, 0)["loss"]
        cast = FrozenWeights(model.llm, "bfloat16", skip=(embeddings,))
        cast.lower()
        lowered = inner(batch, 0)["loss"]
        cast.restore()
    assert len(cast) == len(frozen) and torch.equal(plain, lowered)
    assert len(FrozenWeights(model.llm, "float32")) == 0


def test_a_bfloat16_ctc_stage_learns_like_a_float32_one():
    losses = {}
    for precision in ("float32", "bfloat16"):
        model = vocab_model()
        config = StageConfig(steps=8, batch_size=3, lr=1e-2, warmup=2, checkpoint_every=8, precision=precision)
        history = ctc_stage(model, _examples(model), config, progress=False)
        losses[precision] = history[-1]["ctc"]
    first = ctc_stage(vocab_model(), _examples(vocab_model()), StageConfig(steps=1, batch_size=3, lr=1e-9, warmup=1),
                      progress=False)[-1]["ctc"]
    assert losses["bfloat16"] < first and losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.1)


def test_precision_is_checked_and_a_recipe_sets_it_on_every_stage():
    from speechtrim.train.embedded import EmbeddedRecipe, _as_current
    from speechtrim.precision import cache_suffix

    with pytest.raises(ValueError, match="float32, bfloat16"):
        StageConfig(steps=1, batch_size=1, lr=1e-3, precision="float16")
    with pytest.raises(ValueError, match="float32, bfloat16"):
        EmbeddedRecipe(precision="fp16")
    recipe = EmbeddedRecipe(precision="bfloat16")
    assert {stage.precision for stage in (recipe.ctc, recipe.joint, recipe.balance, recipe.summary,
                                          recipe.summary_words)} == {"bfloat16"}
    assert EmbeddedRecipe().joint.precision == "float32"
    assert _as_current({"ctc": {"steps": 1}})["precision"] == "float32"  # older training.json: float32 ran
    assert _as_current({"ctc": {"steps": 1}})["ctc"]["precision"] == "float32"
    assert cache_suffix("float32") == "" and cache_suffix("bfloat16") == "-bfloat16"


def test_bfloat16_frames_are_cached_apart_from_float32_ones(tmp_path):
    import soundfile

    from speechtrim.train.encoder_cache import EncoderCache
    from speechtrim.train.packing import encode_packed

    model = vocab_model()
    path = tmp_path / "a.wav"
    soundfile.write(path, (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32), 16000,
                    subtype="FLOAT")
    plain = EncoderCache(model, "tiny", folder=tmp_path)
    low = EncoderCache(model, "tiny", folder=tmp_path, precision="bfloat16")
    assert plain.folder != low.folder
    a = encode_packed(model, [path], EncoderCache(model, "tiny-packed", folder=tmp_path), progress=False)[0]
    b = encode_packed(model, [path], EncoderCache(model, "tiny-packed", folder=tmp_path, precision="bfloat16"),
                      progress=False)[0]
    assert a.shape == b.shape and not torch.equal(a, b)  # computed anew in bfloat16, not read from float32's files
    torch.testing.assert_close(b, a, atol=0.1, rtol=0.1)
    solo = low.get([path], progress=False)[0]
    assert solo.dtype == torch.float32 and solo.shape[1] == 32


def test_the_math_attention_kernel_is_picked_for_training_steps_only():
    from speechtrim.precision import compute_precision

    with compute_precision("bfloat16", "cpu", backward=True):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with compute_precision("bfloat16", "cpu"):  # encoding: the fused kernel, 3x faster at 1,500 frames
        assert torch.backends.cuda.flash_sdp_enabled() and torch.is_autocast_enabled("cpu")
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")
