"""Evaluation harness: sets from manifests, task scores, fidelity, and the timed runner against generate()."""

import json

import numpy as np
import pytest
import soundfile
import torch

from speechtrim import reducers
from speechtrim.bench.runner import EmbeddedModel, load_bench_model, run_item
from speechtrim.eval.harness import (
    EvalDataError,
    EvalItem,
    fidelity,
    load_eval_set,
    load_manifest_set,
    task_scores,
)
from tests.test_bench import tiny_bench_model


def write_clips(folder, count=3, seconds=0.5):
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"clip{index}.wav"
        soundfile.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        paths.append(path)
    return paths


def test_manifest_tasks(tmp_path):
    paths = write_clips(tmp_path)
    asr = tmp_path / "asr.jsonl"
    rows = [json.dumps({"audio": p.name, "transcript": f"words {i}"}) for i, p in enumerate(paths)]
    asr.write_text("\n".join(rows) + "\n")
    data = load_manifest_set(asr)
    assert data.task == "asr" and len(data) == 3 and data.candidates is None
    assert data.items[1].reference == "words 1" and "<audio>" in data.items[1].prompt
    emotion = tmp_path / "emo.csv"
    emotion.write_text("audio,label\n" + "".join(f"{p.name},{lab}\n" for p, lab in zip(paths, ["sad", "happy", "sad"])))
    data = load_eval_set(str(emotion), limit=2)
    assert data.task == "emotion" and data.labels == ("happy", "sad") and len(data) == 2
    assert data.candidates == [" happy", " sad"]
    translation = tmp_path / "st.jsonl"
    translation.write_text(json.dumps({"audio": paths[0].name, "translation": "Hallo Welt"}) + "\n")
    data = load_eval_set(str(translation), target_language="German")
    assert data.task == "translation" and "German" in data.items[0].prompt


def test_manifest_bad_rows(tmp_path):
    paths = write_clips(tmp_path, count=1)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"audio": paths[0].name, "transcript": "a"}) + "\n"
                       + json.dumps({"audio": "nowhere.wav", "transcript": "b"}) + "\n")
    with pytest.raises(EvalDataError, match="row 2.*nowhere.wav.*does not exist"):
        load_manifest_set(missing)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"audio": paths[0].name, "transcript": "a"}) + "\n"
                     + json.dumps({"audio": paths[0].name, "label": "sad"}) + "\n")
    with pytest.raises(EvalDataError, match="mixes tasks"):
        load_manifest_set(mixed)
    with pytest.raises(EvalDataError, match="unknown data"):
        load_eval_set("librispeech")
    with pytest.raises(EvalDataError, match="does not exist"):
        load_eval_set(str(tmp_path / "absent.csv"))


def test_task_scores_and_fidelity():
    scores = task_scores("asr", ["the cat sat", "a dog"], ["the cat sat", "a frog"])
    assert scores["wer"] == pytest.approx(1 / 5)
    scores = task_scores("emotion", ["sad", "happy", "sad", "angry"], ["sad", "sad", "sad", "angry"])
    assert scores["accuracy"] == pytest.approx(0.75) and scores["ua"] == pytest.approx((1 + 0 + 1) / 3)
    scores = task_scores("translation", ["the house is small"], ["the house is small"])
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert fidelity("asr", ["red green blue"], ["red green blue"]) == 0.0
    assert fidelity("asr", ["red green blue"], ["red green"]) == pytest.approx(1 / 3)
    assert fidelity("asr", ["", ""], ["x", "y"]) is None  # no reference words: undefined, not invented
    assert fidelity("emotion", ["sad", "happy"], ["sad", "sad"]) == 0.5
    with pytest.raises(ValueError, match="unknown task"):
        task_scores("captioning", ["a"], ["a"])


@pytest.mark.parametrize("method", [None, "fastadasp", "h2o"])
def test_runner_matches_generate(one_thread, method):
    """The timed step-by-step loop produces exactly greedy generate()'s tokens, with and without a reducer."""
    speech = tiny_bench_model()
    model = EmbeddedModel(speech, "tiny")
    rng = np.random.default_rng(1)
    item = EvalItem("x", (0.1 * rng.standard_normal(16000)).astype(np.float32), "ref", "transcribe this <audio> \n")
    prepared = model.prepare(item)
    build = (lambda: reducers.build(method, ratio=0.4, layer=2)) if method else (lambda: None)
    run = run_item(model, prepared, build(), None, max_new_tokens=6, repeats=2)
    batch = speech.build_inputs([item.prompt], *speech.embed_audio(*speech.encode([item.audio])))
    reducer = build()
    with (reducer(speech.llm, audio_spans=batch.audio_spans) if reducer else torch.no_grad()):
        expected = speech.generate(batch, max_new_tokens=6)[0]
    assert run.generated == expected
    assert run.decode_steps <= 5 and run.prefill_s > 0 and run.kv_cache_bytes > 0
    assert run.peak_mem_mb is None  # CPU: not measured, never invented
    if method == "fastadasp":
        assert run.tokens_per_layer[2] < run.tokens_per_layer[0] and run.flops_reduction > 0
    if method == "h2o":
        assert run.flops_reduction == 0.0 and run.cache_tokens_per_layer[-1] < run.tokens_per_layer[-1]


def test_runner_labels_match_score(one_thread):
    speech = tiny_bench_model()
    model = EmbeddedModel(speech, "tiny")
    rng = np.random.default_rng(2)
    candidates = [" happy", " sad", " very angry"]
    for index in range(3):
        item = EvalItem("x", (0.1 * rng.standard_normal(12000)).astype(np.float32), "sad", "what emotion <audio> \n")
        run = run_item(model, model.prepare(item), None, candidates, max_new_tokens=2)
        batch = speech.build_inputs([item.prompt], *speech.embed_audio(*speech.encode([item.audio])))
        expected = candidates[int(speech.score(batch, candidates)[0].argmax())].strip()
        assert run.output == expected


def test_long_audio_is_windowed(one_thread):
    model = EmbeddedModel(tiny_bench_model(), "tiny")
    item = EvalItem("long", np.zeros(16000 * 31, dtype=np.float32), "", "transcribe this <audio> \n")
    prepared = model.prepare(item)
    assert prepared.audio_tokens == 31 * 50  # two encoder windows joined: 1500 + 50 frames


def test_unreachable_hub_model_says_no_network_needed():
    with pytest.raises(ValueError, match="No network is needed for the embedded default"):
        load_bench_model("no-such-org/no-such-speech-llm")


@pytest.mark.slow
def test_synthetic_asr_set_renders_once(tmp_cache, monkeypatch):
    from speechtrim.data import synthetic_asr

    recipe = synthetic_asr.SyntheticASRRecipe(sentences=3, voices_per_sentence=2)
    clips = synthetic_asr.load_synthetic_asr(recipe)
    assert len(clips) == 6 and all(clip.synthetic and clip.audio_path.is_file() for clip in clips)
    assert len({clip.speaker for clip in clips}) >= 3 and clips[0].text == synthetic_asr.SENTENCES[0]
    monkeypatch.setattr(synthetic_asr, "synthesize", lambda *a, **k: pytest.fail("rendered again"))
    assert [clip.id for clip in synthetic_asr.load_synthetic_asr(recipe)] == [clip.id for clip in clips]
    with pytest.raises(ValueError, match="voices_per_sentence"):
        synthetic_asr.SyntheticASRRecipe(voices_per_sentence=0)
