"""Bad command-line input: each is refused before anything is loaded, with a message that names the problem and
the fix (exit status 2, no traceback)."""

import pytest

from speechtrim.cli import main

BENCH_CASES = [
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--targets", "1.5"], "--targets takes FLOPs reductions in (0, 1) such as 0.1,0.3,0.5; got [1.5]"),
    (["--targets", "0"], "--targets takes FLOPs reductions in (0, 1) such as 0.1,0.3,0.5; got [0.0]"),
    (["--targets", "nan"], "--targets takes FLOPs reductions in (0, 1)"),
    (["--targets", ","], "--targets takes comma-separated numbers such as 0.1,0.3,0.5, got ','"),
    (["--layer", "abc"], "--layer takes a layer number or 'auto', got 'abc'"),
    (["--layer", "-1"], "--layer must be >= 0 or 'auto', got -1"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1, got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--scaling", "--scaling-lengths", "-5"], "--scaling-lengths takes audio lengths in seconds such as 30,60,120"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--limit", "0"], "--limit must be >= 1 clip, got 0"),
    (["--beams", "0"], "--beams 0 --ctc-weight 0.0: beams must be an int >= 1 (1: greedy), got 0"),
    (["--ctc-weight", "0.5"], "chooses among beam hypotheses: use 2 or more beams"),
    (["--beams", "4", "--scaling"], "drop --beams/--ctc-weight"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "4", "--scaling"], "drop --batch-size"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any option error surfaces only after the model (or data) loading started."""
    import speechtrim.bench.runner as runner
    import speechtrim.eval.harness as harness

    def refuse(*args, **kwargs):
        raise AssertionError("the model or data was loaded before the bad option was refused")

    monkeypatch.setattr(runner, "load_bench_model", refuse)
    monkeypatch.setattr(harness, "load_eval_set", refuse)


@pytest.mark.parametrize("arguments, message", BENCH_CASES, ids=[" ".join(a) for a, _ in BENCH_CASES])
def test_bad_bench_options_are_refused_before_loading(arguments, message, capsys, no_model_load):
    assert main(["bench", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys, no_model_load):
    (tmp_path / "f").write_text("x")
    assert main(["bench", "--out", str(tmp_path / "f")]) == 2
    assert "is a file; bench writes a folder" in capsys.readouterr().err


MANIFEST_CASES = [
    ("extra.csv", b"audio,transcript\nc.wav,hello,world\n", "row 1: 3 fields but the header has 2"),
    ("list.jsonl", b'["c.wav", "hello"]\n', "line 1: each line must be a JSON object"),
    ("number.jsonl", b'{"audio": 5, "transcript": "hi"}\n', "row 1: 'audio' must be a file path (a string), got int 5"),
    ("latin.csv", "audio,transcript\nc.wav,caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    ("empty.csv", b"audio,transcript\nc.wav,\n", "row 1: the 'transcript' value is empty; fill it in or drop the row"),
]


@pytest.mark.parametrize("name, content, message", MANIFEST_CASES, ids=[case[0] for case in MANIFEST_CASES])
def test_bad_manifests_name_the_file_the_row_and_the_fix(name, content, message, tmp_path, capsys):
    import numpy as np
    import soundfile

    soundfile.write(tmp_path / "c.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / name).write_bytes(content)
    assert main(["bench", "--data", str(tmp_path / name)]) == 2
    error = capsys.readouterr().err
    assert message in error and name in error and "Traceback" not in error


def test_emotion_manifests_share_the_reader(tmp_path):
    from speechtrim.data.emotion import DatasetError, load_manifest

    (tmp_path / "m.jsonl").write_text('"just a string"\n')
    with pytest.raises(DatasetError, match="each line must be a JSON object"):
        load_manifest(tmp_path / "m.jsonl")


def test_transcribe_output_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import speechtrim.assets.whisper as whisper

    monkeypatch.setattr(whisper, "load_whisper", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["transcribe", "--output", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder; pass a file name" in capsys.readouterr().err


def test_select_layer_options_are_checked_before_loading(capsys, monkeypatch):
    import speechtrim.cli as cli

    monkeypatch.setattr(cli, "_embedded_speechlm", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["select-layer", "--method", "tome"]) == 2
    assert "unknown --method 'tome'; choose from" in capsys.readouterr().err
    assert main(["select-layer", "--ratio", "1.5"]) == 2
    assert "--ratio must be in (0, 1), got 1.5" in capsys.readouterr().err


def test_a_selection_on_more_data_is_not_overwritten_without_force(tmp_path, monkeypatch):
    from speechtrim.layer_store import check_overwrite, save_selection, selection_path
    from tests.tiny_models import tiny_llama

    monkeypatch.setenv("SPEECHTRIM_CACHE", str(tmp_path))
    model = tiny_llama()
    save_selection(model, {1: 0.2, 2: 0.1, 3: 0.3}, "fastadasp", 0.5, {"data": "pocketsphinx", "clips": 8})
    with pytest.raises(ValueError, match="calibrated on 8 clips and 3 candidate layers.*--force"):
        check_overwrite(model, {"data": "pocketsphinx", "clips": 1}, [2])
    check_overwrite(model, {"data": "pocketsphinx", "clips": 1}, [2], force=True)
    check_overwrite(model, {"data": "pocketsphinx", "clips": 8}, [1, 2, 3])
    assert selection_path(model).is_file()


def test_a_data_set_named_twice_is_refused(capsys, no_model_load):
    assert main(["bench", "--data", "pocketsphinx,pocketsphinx"]) == 2
    assert "--data names pocketsphinx more than once" in capsys.readouterr().err


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "fastadasp" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "attn_q_mean" in capsys.readouterr().out


def test_degenerate_clips_are_warned_and_one_label_emotion_sets_refused(tmp_path, caplog):
    import numpy as np
    import soundfile

    from speechtrim.eval.harness import EvalDataError, load_manifest_set

    soundfile.write(tmp_path / "short.wav", np.full(160, 0.1, dtype=np.float32), 16000)
    soundfile.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    soundfile.write(tmp_path / "clipped.wav", np.sign(np.sin(np.arange(16000))).astype(np.float32), 16000)
    rows = [f'{{"audio": "{name}.wav", "transcript": "hello"}}' for name in ("short", "silent", "clipped")]
    (tmp_path / "asr.jsonl").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        load_manifest_set(tmp_path / "asr.jsonl")
    for needle in ("only 10 ms long", "silent (peak below 1e-4)", "clipped (over 1 % of the samples"):
        assert needle in caplog.text
    (tmp_path / "emo.jsonl").write_text('{"audio": "silent.wav", "label": "happy"}\n' * 2)
    with pytest.raises(EvalDataError, match="every row has the label 'happy'; an emotion set needs at least two"):
        load_manifest_set(tmp_path / "emo.jsonl")


def test_a_manifest_can_say_its_audio_is_synthetic(tmp_path):
    import numpy as np
    import soundfile

    from speechtrim.eval.harness import load_manifest_set

    soundfile.write(tmp_path / "tone.wav", (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    (tmp_path / "m.csv").write_text("audio,transcript,synthetic\ntone.wav,a tone,true\n")
    evalset = load_manifest_set(tmp_path / "m.csv")
    assert evalset.synthetic and "SYNTHETIC" in evalset.describe()


def test_no_progress_hides_the_transformers_bars_and_warnings_stay_quiet():
    import argparse

    from transformers.utils import logging as transformers_logging

    from speechtrim.cli import _quiet_libraries

    try:
        _quiet_libraries(argparse.Namespace(verbose=False, no_progress=True))
        assert not transformers_logging.is_progress_bar_enabled()
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    finally:
        transformers_logging.enable_progress_bar()
        transformers_logging.set_verbosity_warning()


@pytest.mark.slow
def test_a_layer_beyond_the_embedded_model_is_refused_before_loading(capsys, no_model_load):
    assert main(["bench", "--layer", "99"]) == 2
    assert "--layer 99 is outside the model's 30 decoder layers; pass 0 to 29" in capsys.readouterr().err


def test_neural_voices_without_their_engines_are_refused_before_training(capsys, monkeypatch, tmp_path):
    import speechtrim.synth as synth
    import speechtrim.train.embedded as embedded

    monkeypatch.setattr(embedded, "train_embedded", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    monkeypatch.setattr(synth, "available_engines", lambda: ["flite", "festival", "espeak-ng", "kokoro"])
    assert main(["train-embedded", "--out", str(tmp_path / "model"), "--neural-seeds", "0"]) == 2
    assert "neural_voices needs the engines ['piper'], not installed: pip install 'speechtrim[voices]'" in \
        capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--asr-seeds", "0,x"], "--asr-seeds takes comma-separated integers, e.g. 0,1; got '0,x'"),
    (["--wordnet-sentences", "-3"], "wordnet_sentences must be an int >= 0 (0: none), got -3"),
    (["--asr-seeds", ""], "asr_seeds and neural_seeds are both empty"),
    (["--neural-seeds", "1,1", "--asr-seeds", ""], "neural_seeds must be distinct integer seeds, got (1, 1)"),
    (["--ctc-dropout", "1.5"], "feature_dropout must be in [0, 1), got 1.5"),
    (["--ctc-pieces", "0"], "ctc_max_piece must be None (the LLM's own tokens) or an int >= 1, got 0"),
])
def test_bad_training_data_options_are_refused_before_training(arguments, message, capsys, monkeypatch, tmp_path):
    import speechtrim.train.embedded as embedded

    monkeypatch.setattr(embedded, "train_embedded", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    assert main(["train-embedded", "--out", str(tmp_path / "model"), *arguments]) == 2
    assert message in capsys.readouterr().err
