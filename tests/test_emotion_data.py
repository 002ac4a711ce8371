"""Emotion data sets: manifests, EmoDB / RAVDESS folders, the synthetic set, and the errors raised before training."""

import json

import numpy as np
import pytest
import soundfile

from speechtrim.data.emotion import DatasetError, check_folds, load_emodb, load_manifest, load_ravdess
from speechtrim.eval.metrics import agreement, classification_metrics, mean_std


def tone(path, seconds=0.2):
    soundfile.write(path, (0.1 * np.sin(np.arange(int(16000 * seconds)) / 5)).astype(np.float32), 16000)
    return path


def test_csv_and_jsonl_manifests(tmp_path):
    tone(tmp_path / "a.wav"), tone(tmp_path / "b.wav")
    (tmp_path / "m.csv").write_text("audio,label,speaker\na.wav,happy,s1\nb.wav,sad,s2\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav", "label": "happy", "transcript": "hi"}) + "\n")
    csv_set = load_manifest(tmp_path / "m.csv")
    assert [e.label for e in csv_set.examples] == ["happy", "sad"] and csv_set.labels == ("happy", "sad")
    assert csv_set.examples[1].speaker == "s2" and csv_set.examples[0].audio_path == tmp_path / "a.wav"
    assert load_manifest(tmp_path / "m.jsonl").examples[0].text == "hi"


@pytest.mark.parametrize(
    "content, message",
    [
        ("audio,label\nmissing.wav,happy\n", "row 1 .*does not exist"),
        ("audio,label\nbroken.wav,happy\n", "row 1 .*unreadable"),
        ("audio,label\na.wav,elated\n", "row 1 .*unknown label 'elated'"),
        ("audio,label\n", "no usable examples"),
        ("file,emotion\na.wav,happy\n", "row 1: needs an 'audio'"),
    ],
)
def test_bad_manifest_rows_are_named(tmp_path, content, message):
    tone(tmp_path / "a.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00not really audio")
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_manifest(tmp_path / "m.csv", labels=["happy", "sad"])


def test_unsupported_manifest_type(tmp_path):
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(DatasetError, match="csv"):
        load_manifest(tmp_path / "m.txt")


def test_emodb_and_ravdess_folder_names(tmp_path):
    for name in ["03a01Fa.wav", "03a01Wa.wav", "10b02La.wav"]:  # happy, angry, boredom (skipped)
        tone(tmp_path / name)
    emodb = load_emodb(tmp_path)
    assert sorted(e.label for e in emodb.examples) == ["angry", "happy"] and emodb.examples[0].speaker == "03"
    ravdess_dir = tmp_path / "rav" / "Actor_12"
    ravdess_dir.mkdir(parents=True)
    for name in ["03-01-05-01-02-01-12.wav", "03-01-02-01-01-01-12.wav"]:  # angry, calm (skipped)
        tone(ravdess_dir / name)
    ravdess = load_ravdess(tmp_path / "rav")
    assert [e.label for e in ravdess.examples] == ["angry"] and ravdess.examples[0].speaker == "12"


def test_fold_count_must_fit_every_class(tmp_path):
    tone(tmp_path / "a.wav")
    rows = "audio,label\n" + "a.wav,happy\n" * 5 + "a.wav,sad\n" * 2
    (tmp_path / "m.csv").write_text(rows)
    dataset = load_manifest(tmp_path / "m.csv")
    check_folds(dataset, 2)
    with pytest.raises(DatasetError, match="fewer examples than folds=5.*'sad': 2"):
        check_folds(dataset, 5)


def test_metrics_against_hand_computation():
    refs = ["a", "a", "a", "b"]
    preds = ["a", "a", "b", "b"]
    scores = classification_metrics(refs, preds)
    assert scores["wa"] == pytest.approx(0.75)
    assert scores["ua"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert agreement(["x", "y"], ["x", "z"]) == 0.5
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


@pytest.mark.slow
def test_synthetic_emotion_set_is_balanced_and_text_carries_no_label(tmp_cache):
    from speechtrim.data.synthetic_emotion import SyntheticEmotionRecipe, load_synthetic_emotion

    recipe = SyntheticEmotionRecipe(languages=("en", "de"), voices_per_language=2, sentences_per_language=2)
    dataset = load_synthetic_emotion(recipe)
    assert dataset.synthetic and all(e.synthetic for e in dataset.examples)
    assert len(dataset) == 2 * 2 * 2 * 6
    by_label = {label: sorted((e.speaker, e.text) for e in dataset.examples if e.label == label)
                for label in dataset.labels}
    assert len({tuple(v) for v in by_label.values()}) == 1, "every class must say the same sentences with the same voices"
    durations = {label: np.mean([soundfile.info(str(e.audio_path)).duration for e in dataset.examples if e.label == label])
                 for label in dataset.labels}
    assert durations["sad"] > durations["neutral"] > durations["fear"], durations  # slow vs fast speech
    again = load_synthetic_emotion(recipe)  # from the cache, same files
    assert [e.audio_path for e in again.examples] == [e.audio_path for e in dataset.examples]
