"""The packaged embedded model: its files, the record of how it was made, and that it hears."""

import json

import pytest

from speechtrim.bench.runner import EMBEDDED_WEIGHTS
from speechtrim.models.storage import CONFIG_FILE, TRAINED_FILE
from speechtrim.train.embedded import TRAINING_FILE


def test_the_packaged_model_records_how_it_was_made():
    record = json.loads((EMBEDDED_WEIGHTS / TRAINING_FILE).read_text())
    config = json.loads((EMBEDDED_WEIGHTS / CONFIG_FILE).read_text())
    assert record["command"].startswith("speechtrim ") and "train-embedded" in record["command"].split()
    assert record["recipe"]["encoder"] == config["encoder"] == "base" and config["adapter"] == "none"
    assert config["projector"] == "vocab" and config["pool"] <= 4  # >= 12.5 audio tokens per second
    assert record["data"]["asr"]["synthetic"] is True
    joint = record["history"]["joint"]
    assert record["history"]["summary"] and record["history"]["summary_words"][-1]["summary"] < 0.1
    assert joint[-1]["step"] == record["recipe"]["joint"]["steps"] and joint[-1]["lm"] < joint[0]["lm"]
    assert set(record["held_out"]) == {"synthetic-asr", "pocketsphinx", "synthetic-emotion"}
    assert (EMBEDDED_WEIGHTS / TRAINED_FILE).stat().st_size <= 20 * 2**20
    # The budget is 90 min wall, rendering and encoding included: the packaged run (one command, bfloat16,
    # 2 cores, fresh caches) took 78 min; the record carries every stage's clock.
    assert set(record["stage_seconds"]) >= {"render", "encode", "ctc", "joint", "balance", "summary", "evaluate"}
    assert 0 < record["train_seconds"] <= record["total_seconds"] <= 90 * 60
    assert sum(record["stage_seconds"].values()) <= record["total_seconds"]


@pytest.mark.slow
def test_the_packaged_model_hears_held_out_speech():
    """The transcripts come from the audio: WER <= 0.35 on 8 held-out clips (0.25 when written; the previous
    projector, which did not hear, had 1.14), and swapping two clips' audio swaps their transcripts."""
    from speechtrim.bench.runner import load_bench_model
    from speechtrim.eval.harness import load_eval_set, task_scores

    model = load_bench_model("embedded").speechlm
    evalset = load_eval_set("synthetic-asr", 8)
    audios = [item.audio for item in evalset.items]
    prompts = [item.prompt for item in evalset.items]
    outputs = model.generate(model.prepare(audios, prompts), max_new_tokens=40)
    references = [item.reference for item in evalset.items]
    assert task_scores("asr", references, outputs)["wer"] <= 0.35, list(zip(references, outputs))
    swapped = model.generate(model.prepare([audios[1], audios[0]], prompts[:2]), max_new_tokens=40)
    follows_audio = task_scores("asr", [outputs[1], outputs[0]], swapped)["wer"]
    follows_position = task_scores("asr", outputs[:2], swapped)["wer"]
    assert follows_audio <= 0.25 and follows_position >= 0.5, (outputs[:2], swapped)


@pytest.mark.slow
def test_the_packaged_model_recognises_emotion_on_held_out_clips():
    from speechtrim.bench.runner import load_bench_model
    from speechtrim.train.embedded import evaluate

    bench_model = load_bench_model("embedded")
    assert bench_model.trained and bench_model.speechlm.has_ctc_head and not bench_model.speechlm.has_lora
    scores = evaluate(bench_model.speechlm, limit=12, progress=False)
    # chance is 1/6; 0.941 on all 288 held-out clips for the packaged model (0.36 before the utterance summary)
    assert bench_model.speechlm.projector.summary is not None
    assert scores["synthetic-emotion"]["accuracy"] >= 0.5, scores["synthetic-emotion"]


@pytest.mark.slow
def test_the_packaged_layer_selection_belongs_to_the_packaged_model(tmp_path, monkeypatch):
    """layer="auto" on a fresh clone uses the transfer-entropy selection shipped beside the weights; it must have
    been measured on these weights (re-run `speechtrim select-layer --force` and copy it after retraining)."""
    from speechtrim import layer_store
    from speechtrim.bench.runner import load_bench_model
    from speechtrim.layer_store import find_selection, model_key

    monkeypatch.setattr(layer_store, "selection_path", lambda model: tmp_path / f"{model_key(model)}.json")

    selection = json.loads((EMBEDDED_WEIGHTS / "layer-selection.json").read_text())
    model = load_bench_model("embedded").speechlm
    assert selection["model_key"] == model_key(model.llm)
    assert selection["calibration"]["clips"] >= 8 and selection["selected_layer"] in selection["candidates"]
    assert find_selection(model.llm) == EMBEDDED_WEIGHTS / "layer-selection.json"  # this machine's cache ignored
