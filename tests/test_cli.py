"""The console script: help, JSON last lines, clear errors, and the main job on real speech."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from speechtrim.cli import main


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("assets", "transcribe", "select-layer"):
        assert command in out


def test_assets_list_ends_with_json(capsys):
    assert main(["assets", "list"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert {asset["name"] for asset in summary["assets"]} == {"whisper-tiny.en", "whisper-base", "smollm2-135m"}


def test_unknown_asset_is_a_clear_error(capsys):
    assert main(["assets", "prepare", "gpt-5"]) == 2
    assert "unknown asset(s) ['gpt-5']" in capsys.readouterr().err


def test_bad_audio_file_names_the_file(tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert main(["transcribe", str(empty)]) == 2
    assert "empty.wav" in capsys.readouterr().err


def test_bad_layer_ranges_are_refused(capsys):
    assert main(["select-layer", "--layers", "one-two"]) == 2
    assert "--layers" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_transcribes_real_speech_with_a_low_wer():
    result = subprocess.run([sys.executable, "-m", "speechtrim.cli", "transcribe"], capture_output=True, text=True,
                            check=True)
    summary = last_json(result.stdout)
    assert summary["clips"] == 10 and summary["wer"] <= 0.15
    assert "| sense_and_sensibility_01_austen_64kb-0880 |" in result.stdout


@pytest.mark.slow
def test_transcribe_a_user_file_with_the_multilingual_model(tmp_path, capsys):
    from speechtrim.synth import synthesize

    speech = synthesize("the quick brown fox jumps over the lazy dog", engine="flite", voice="slt")
    path = tmp_path / "fox.flac"
    soundfile.write(path, speech.audio, 16000)
    assert main(["transcribe", "--model", "base", "--language", "en", str(path)]) == 0
    out = capsys.readouterr().out
    assert last_json(out)["clips"] == 1 and "wer" not in last_json(out)  # no reference, no WER
    assert "fox" in out.lower() and "lazy dog" in out.lower()


def test_python_dash_m_speechtrim_is_the_console_script():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "speechtrim", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: speechtrim" in result.stdout and "bench" in result.stdout
