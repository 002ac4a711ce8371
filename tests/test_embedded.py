"""Training the embedded model (issue 5) end to end on a tiny SpeechLM: data mix, held-out scores, saved files."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from speechtrim.data.synthetic_asr import (SENTENCES, SyntheticASRTrainRecipe, fortune_sentences, training_sentences,
                                           wordnet_sentences)
from speechtrim.eval.harness import EvalItem, EvalSet
from speechtrim.models.speechlm import SpeechLM
from speechtrim.prompts import ASR_PROMPT, EMOTION_ANSWER_PREFIX
from speechtrim.train.embedded import EmbeddedRecipe, train_embedded, training_data
from speechtrim.train.hearing import StageConfig
from tests.tiny_speechlm import tiny_speechlm


def tiny_build(encoder="tiny", llm="tiny", adapter="none", adapter_params=None, pool=1, seed=0, projector="linear",
               projector_params=None):
    base = tiny_speechlm(seed=0)  # the frozen parts are the packaged ones: the same every time
    torch.manual_seed(seed)
    model = SpeechLM(base.encoder, base.feature_extractor, base.llm, base.tokenizer, adapter=adapter, pool=pool,
                     projector=projector, projector_params=projector_params)
    model.speech_config.encoder, model.speech_config.llm = encoder, llm
    return model


def tiny_eval_set(spec, limit=None):
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(8000)).astype(np.float32) for _ in range(3)]
    if spec == "synthetic-emotion":
        items = [EvalItem(f"e{i}", a, label, "what the emotion : <audio>", EMOTION_ANSWER_PREFIX, synthetic=True)
                 for i, (a, label) in enumerate(zip(audio, ["angry", "sad", "happy"]))]
        return EvalSet(spec, "emotion", items, ("angry", "happy", "sad"), synthetic=True)
    return EvalSet(spec, "asr", [EvalItem(f"a{i}", a, "the audio", ASR_PROMPT) for i, a in enumerate(audio)])


@pytest.fixture
def tiny_world(monkeypatch, tmp_cache):
    import speechtrim.assets.whisper as whisper_assets
    import speechtrim.eval.harness as harness
    import speechtrim.models.storage as speechlm_module

    monkeypatch.setattr(speechlm_module, "build_speechlm", tiny_build)
    monkeypatch.setattr(whisper_assets, "whisper_cache_dir", lambda name: tmp_cache / f"whisper-{name}")
    monkeypatch.setattr(harness, "load_eval_set", tiny_eval_set)
    return speechlm_module


def test_training_sentences_are_distinct_seeded_and_never_held_out():
    sentences = training_sentences(300, seed=3)
    assert len(set(sentences)) == 300 and sentences == training_sentences(300, seed=3)
    assert not {s.lower() for s in sentences} & {s.lower() for s in SENTENCES}
    assert sentences != training_sentences(300, seed=4)
    assert all(5 <= len(s.split()) <= 16 and not any(c.isdigit() for c in s) for s in sentences)


def test_wordnet_sentences_are_plain_everyday_english_and_never_held_out():
    sentences = wordnet_sentences()
    assert len(sentences) > 20000 and sentences == sorted(set(sentences))
    assert all(s[0].isupper() and s.endswith(".") and 5 <= len(s.split()) <= 16 for s in sentences)
    assert not any(c.isdigit() or c in '"-;()' for s in sentences for c in s)
    assert "The children played in the park." not in SENTENCES
    plain = {" ".join(s.lower().strip(".").replace(",", "").split()) for s in sentences}
    assert not plain & {" ".join(s.lower().strip(".?").replace(",", "").split()) for s in SENTENCES}
    drawn = training_sentences(50, seed=1, text="wordnet")
    assert len(set(drawn)) == 50 and set(drawn) <= set(sentences) and drawn == training_sentences(50, 1, "wordnet")
    words = {word.strip(".,").lower() for s in sentences for word in s.split()}
    assert {"umbrella", "flight", "chairs", "museum"} <= words  # everyday words the fortunes lack or rarely use


def test_training_text_names_the_missing_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet_sentences(tmp_path / "no-wordnet")
    with pytest.raises(ValueError, match="unknown training text 'poems'"):
        training_sentences(5, text="poems")
    with pytest.raises(ValueError, match="text must be one of"):
        SyntheticASRTrainRecipe(text="poems")
    with pytest.raises(ValueError, match="wordnet_sentences must be an int >= 0"):
        EmbeddedRecipe(wordnet_sentences=-1)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortune_sentences(tmp_path / "no-fortunes")
    with pytest.raises(ValueError, match="count must be between"):
        training_sentences(0)


def test_neural_voices_join_the_debian_ones_and_keep_the_old_cache_folders(monkeypatch, tmp_cache):
    from speechtrim import synth
    from speechtrim.data import synthetic_asr

    debian, neural = SyntheticASRTrainRecipe(), SyntheticASRTrainRecipe(neural_voices=True)
    assert debian.voices == synthetic_asr.TRAIN_VOICES
    assert neural.voices == synthetic_asr.TRAIN_VOICES + synthetic_asr.NEURAL_TRAIN_VOICES
    assert {engine for engine, *_ in synthetic_asr.NEURAL_TRAIN_VOICES} == set(synth.NEURAL_ENGINES)
    assert debian.key() == "50010d4960ef"  # the folder the packaged model's renderings were cached in
    assert neural.key() != debian.key()
    weights = np.array([weight for *_, weight in neural.voices], dtype=float)
    share = weights[len(synthetic_asr.TRAIN_VOICES):].sum() / weights.sum()
    assert 0.4 < share < 0.6  # about half of the clips
    with pytest.raises(ValueError, match="neural_voices must be True or False"):
        SyntheticASRTrainRecipe(neural_voices="yes")
    with pytest.raises(ValueError, match="neural_seeds must be distinct integer seeds"):
        EmbeddedRecipe(neural_seeds=(2, 2))
    with pytest.raises(ValueError, match="asr_seeds and neural_seeds are both empty"):
        EmbeddedRecipe(asr_seeds=())
    monkeypatch.setattr(synth, "available_engines", lambda: ["flite", "festival", "espeak-ng"])
    rendered = []
    monkeypatch.setattr(synthetic_asr, "synthesize", lambda *a, **k: rendered.append(a))
    with pytest.raises(FileNotFoundError, match=r"\['kokoro', 'piper'\], not installed: pip install"):
        synthetic_asr.load_synthetic_asr_train(SyntheticASRTrainRecipe(sentences=3, neural_voices=True))
    assert not rendered and not list(tmp_cache.glob("synthetic-asr-train-*"))
    asked = []

    def ask(recipe, workers=2):
        asked.append(recipe)
        if len(asked) == 3:
            raise KeyboardInterrupt  # what training_data asks for is all this test needs
        return []

    monkeypatch.setattr(synthetic_asr, "load_synthetic_asr_train", ask)
    with pytest.raises(KeyboardInterrupt):
        training_data(None, EmbeddedRecipe(asr_seeds=(0, 1), neural_seeds=(0,)), progress=False)
    assert [(recipe.seed, recipe.neural_voices) for recipe in asked] == [(0, False), (1, False), (0, True)]


def test_embedded_training_mixes_tasks_scores_held_out_sets_and_saves(tiny_world, tmp_path):
    recipe = EmbeddedRecipe(encoder="tiny", llm="tiny", pool=2, asr_sentences=3, asr_seeds=(0, 1), wordnet_sentences=2, emotion_seeds=(1, 2), emotion_voices=1,
                            emotion_sentences=1, emotion_repeat=1, projector_hidden=16, prosody_rank=2, lora_rank=2,
                            ctc=StageConfig(steps=3, batch_size=4, lr=1e-3, warmup=1, time_mask=0.1,
                                            feature_dropout=0.1),
                            joint=StageConfig(steps=4, batch_size=4, lr=1e-3, warmup=1, checkpoint_every=2,
                                              evaluate_every=2),
                            balance=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1),
                            summary_tokens=2, summary_hidden=8, summary_emotion_seeds=(3, 4),
                            summary=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, ctc_weight=0.0,
                                                lm_reduction="rows", evaluate_every=2),
                            eval_clips=2, eval_emotion_clips=3)
    asr, by_seed, data = training_data(tiny_build(pool=2), recipe, progress=False)
    assert sorted(by_seed) == [1, 2, 3, 4] and all(len(items) == 24 for items in by_seed.values())
    emotion = [item for items in by_seed.values() for item in items]
    alone = {tuple(tensor.shape) for tensor in (by_seed[3][0].frames, by_seed[4][0].frames)}
    packed = {tuple(by_seed[1][0].frames.shape)}
    from speechtrim.assets.cache import cache_root

    solo_files = list((cache_root() / "encoder-frames" / "whisper-tiny").glob("*.safetensors"))
    assert len(solo_files) == 48 and alone and packed  # the summary's clips were encoded alone, as at inference
    assert data["asr"]["clips"] == 8 and len(asr) == 8 and data["emotion"]["clips"] == len(emotion) == 96
    assert [rendering["text"] for rendering in data["asr"]["renderings"]] == ["fortunes", "fortunes", "wordnet"]
    assert all(example.prompt == ASR_PROMPT and example.ctc_target is not None for example in asr)
    assert {example.assistant_prefix for example in emotion} == {EMOTION_ANSWER_PREFIX}
    assert all(example.target.strip() in data["emotion"]["labels"] and example.ctc_target is None
               for example in emotion)
    assert data["vocab_ids"] == sorted(set(data["vocab_ids"]))

    report = train_embedded(recipe, tmp_path / "model", tmp_path / "work", command="speechtrim train-embedded",
                            progress=False)
    saved = json.loads((tmp_path / "model" / "training.json").read_text())
    assert saved["command"] == "speechtrim train-embedded" and saved["recipe"]["joint"]["seed"] == 0
    assert [row["step"] for row in saved["history"]["joint"]] == [2, 4]
    assert {"wer_synthetic", "wer_real", "emotion_accuracy"} <= set(saved["history"]["joint"][-1])  # learning curve
    assert set(saved["history"]["ctc_probe"]) == {"ctc_wer_synthetic", "ctc_wer_real"}
    assert set(saved["stage_seconds"]) == {"render", "encode", "ctc", "joint", "balance", "summary", "evaluate"}
    assert [row["step"] for row in saved["history"]["balance"]] == [2]
    assert [row["step"] for row in saved["history"]["summary"]] == [2]
    assert "emotion_accuracy" in saved["history"]["summary"][-1]
    assert set(saved["held_out"]) == {"synthetic-asr", "pocketsphinx", "synthetic-emotion"}
    assert 0.0 <= saved["held_out"]["synthetic-emotion"]["accuracy"] <= 1.0
    assert saved["held_out"]["synthetic-asr"]["wer"] >= 0.0 and report["held_out"] == saved["held_out"]
    loaded = tiny_world.load_speechlm(tmp_path / "model")
    assert loaded.pool == 2 and loaded.system_prompt == "" and loaded.has_ctc_head and not loaded.has_lora
    assert loaded.projector.vocab_ids.tolist() == data["vocab_ids"]
    assert loaded.projector.summary is not None and loaded.projector.summary.tokens == 2
    fresh = tiny_build(pool=2)
    merged = dict(loaded.llm.named_parameters())
    assert any(not torch.equal(merged[name], p) for name, p in fresh.llm.named_parameters())  # LoRA merged in
    # the reloaded model gives the trained model's outputs (float16 storage: close, not equal)
    frames, mask = torch.randn(1, 10, 32), torch.ones(1, 10, dtype=torch.bool)
    again = tiny_world.load_speechlm(tmp_path / "model")
    torch.testing.assert_close(loaded.embed_audio(frames, mask)[0], again.embed_audio(frames, mask)[0])
    assert saved["held_out"]["pocketsphinx"]["decoding"] == {"num_beams": 4, "ctc_weight": 0.5}  # the recipe's


def test_a_saved_model_is_scored_again_and_its_record_keeps_every_evaluation(tiny_world, tmp_path):
    from speechtrim.train.embedded import reevaluate

    recipe = EmbeddedRecipe(encoder="tiny", llm="tiny", pool=2, asr_sentences=2, asr_seeds=(0,), emotion_voices=1,
                            emotion_sentences=1, emotion_repeat=1, projector_hidden=16, prosody_rank=2, lora_rank=0,
                            ctc=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1),
                            joint=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, evaluate_every=2),
                            balance=None, summary=None, summary_tokens=0, eval_clips=2, eval_emotion_clips=0,
                            eval_beams=1, eval_ctc_weight=0.0)
    train_embedded(recipe, tmp_path / "model", tmp_path / "work", command="speechtrim train-embedded", progress=False)
    path = tmp_path / "model" / "training.json"
    first = json.loads(path.read_text())
    assert first["held_out"]["synthetic-asr"]["decoding"] == {"num_beams": 1, "ctc_weight": 0.0}
    with pytest.raises(ValueError, match="2 or more beams"):
        reevaluate(tmp_path / "model", 1, 0.5)
    with pytest.raises(ValueError, match="leave out --limit"):
        reevaluate(tmp_path / "model", 3, 0.5, limit=2, write=True)
    weights = (tmp_path / "model" / "projector_adapter.safetensors").read_bytes()
    scores = reevaluate(tmp_path / "model", 3, 0.5, command="speechtrim evaluate-embedded --write", write=True)
    record = json.loads(path.read_text())
    assert record["held_out"] == scores and scores["pocketsphinx"]["decoding"] == {"num_beams": 3, "ctc_weight": 0.5}
    assert record["recipe"]["eval_beams"] == 3 and record["recipe"]["eval_ctc_weight"] == 0.5
    assert [e["decoding"] for e in record["evaluations"]] == [{"num_beams": 1, "ctc_weight": 0.0},
                                                             {"num_beams": 3, "ctc_weight": 0.5}]
    assert record["evaluations"][0]["held_out"] == first["held_out"]
    assert record["evaluations"][1]["command"] == "speechtrim evaluate-embedded --write"
    assert record["history"] == first["history"] and record["stage_seconds"] == first["stage_seconds"]
    assert (tmp_path / "model" / "projector_adapter.safetensors").read_bytes() == weights


def test_the_held_out_emotion_seed_is_refused():
    with pytest.raises(ValueError, match="held-out emotion set"):
        EmbeddedRecipe(emotion_seeds=(1, 0))
    with pytest.raises(ValueError, match="distinct seeds"):
        EmbeddedRecipe(emotion_seeds=(1, 1))
    with pytest.raises(ValueError, match="held-out emotion set"):
        EmbeddedRecipe(summary_emotion_seeds=(0, 2))
    with pytest.raises(ValueError, match="must differ from emotion_seeds"):
        EmbeddedRecipe(emotion_seeds=(1, 2), summary_emotion_seeds=(2, 3))


def test_the_balance_pool_holds_the_asked_share_of_emotion_rows():
    from speechtrim.train.embedded import _balanced
    from speechtrim.train.trainer import TrainItem

    asr = [TrainItem(torch.zeros(2, 4), ASR_PROMPT, f"t{i}", "", torch.tensor([0])) for i in range(100)]
    emotion = [TrainItem(torch.zeros(2, 4), "e <audio>", " sad", EMOTION_ANSWER_PREFIX) for _ in range(10)]
    pool = _balanced(asr, emotion, EmbeddedRecipe(balance_emotion_share=0.75))
    emotional = sum(example.ctc_target is None for example in pool)
    assert emotional == 30 and len(pool) == 40
    with pytest.raises(ValueError, match="balance_emotion_share"):
        _balanced(asr, emotion, EmbeddedRecipe(balance_emotion_share=1.0))


def test_a_summary_stage_starts_from_an_earlier_model_and_leaves_the_word_path_alone(tiny_world, tmp_path):
    def recipe(summary):
        return EmbeddedRecipe(encoder="tiny", llm="tiny", pool=2, asr_sentences=3, asr_seeds=(0,), wordnet_sentences=0, emotion_seeds=(1,),
                              emotion_voices=1, emotion_sentences=1, emotion_repeat=1, projector_hidden=16,
                              prosody_rank=2, lora_rank=2,
                              ctc=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1),
                              joint=StageConfig(steps=2, batch_size=4, lr=1e-3, warmup=1),
                              balance=None, summary_tokens=1, summary_hidden=8, summary_emotion_seeds=(2,),
                              summary=summary, eval_clips=2, eval_emotion_clips=3)

    train_embedded(recipe(None), tmp_path / "first", tmp_path / "work1", command="first", progress=False)
    first = json.loads((tmp_path / "first" / "training.json").read_text())
    assert first["history"]["summary"] == [] and "summary" not in first["stage_seconds"]
    stage = StageConfig(steps=3, batch_size=4, lr=1e-2, warmup=1, ctc_weight=0.0, lm_reduction="rows")
    report = train_embedded(recipe(stage), tmp_path / "second", tmp_path / "work2", command="second", progress=False,
                            init=tmp_path / "first")
    assert report["init"]["command"] == "first" and report["history"]["joint"] == first["history"]["joint"]
    assert report["stage_seconds"]["ctc"] == first["stage_seconds"]["ctc"]
    assert [row["step"] for row in report["history"]["summary"]] == [3]
    assert report["train_seconds"] >= first["train_seconds"]
    before = tiny_world.load_speechlm(tmp_path / "first")
    after = tiny_world.load_speechlm(tmp_path / "second")
    assert before.projector.summary is None and after.projector.summary is not None
    for name, tensor in before.state_dict().items():  # projector, LoRA-merged LLM: the words' path is the same
        torch.testing.assert_close(after.state_dict()[name], tensor, rtol=0, atol=0)
    frames, mask = torch.randn(1, 10, 32), torch.ones(1, 10, dtype=torch.bool)
    assert after.summarize(frames, mask).shape == (1, 1, before.llm.config.hidden_size)
    asked = ["say <audio><audio_summary> now"]
    batch = after.build_inputs(asked, *after.embed_audio(frames, mask), summary=after.summarize(frames, mask))
    plain = before.build_inputs(["say <audio> now"], *before.embed_audio(frames, mask))
    assert batch.inputs_embeds.shape[1] == plain.inputs_embeds.shape[1] + 1 and batch.audio_spans == plain.audio_spans
    # a prompt without the marker gets no summary; a model without one drops the marker: the text is the same
    unasked = after.build_inputs(["say <audio> now"], *after.embed_audio(frames, mask),
                                 summary=after.summarize(frames, mask))
    dropped = before.build_inputs(asked, *before.embed_audio(frames, mask))
    torch.testing.assert_close(unasked.inputs_embeds, plain.inputs_embeds)
    torch.testing.assert_close(dropped.inputs_embeds, plain.inputs_embeds)
    with pytest.raises(ValueError, match="at most one"):
        after.build_inputs(["<audio_summary> say <audio>"], *after.embed_audio(frames, mask))

    with pytest.raises(ValueError, match="already has a trained summary"):
        train_embedded(recipe(stage), tmp_path / "third", tmp_path / "work3", progress=False, init=tmp_path / "second")
    other = dataclasses.replace(recipe(stage), projector_hidden=8)
    with pytest.raises(ValueError, match="another recipe.*projector_hidden"):
        train_embedded(other, tmp_path / "third", tmp_path / "work3", progress=False, init=tmp_path / "first")
