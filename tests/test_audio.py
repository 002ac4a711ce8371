"""load_audio, split_windows, duration_seconds: every error path, down-mix, resampling, raw PCM."""

import numpy as np
import pytest
import soundfile as sf

from speechtrim.audio import SAMPLE_RATE, AudioError, duration_seconds, load_audio, split_windows


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine tone (T,) float32."""
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, rate: int) -> float:
    """Frequency of the largest FFT bin, in Hz."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1.0 / rate)[spectrum.argmax()])


# ---- happy paths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampling_keeps_length_and_tone_frequency(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, tone(440.0, 1.5, rate), rate, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 1.5 * SAMPLE_RATE) <= 1
    assert abs(peak_frequency(audio, SAMPLE_RATE) - 440.0) < 2.0
    assert 0.3 < np.abs(audio).max() < 0.6  # the anti-alias filter keeps the level of an in-band tone


def test_resampling_removes_content_above_the_new_nyquist(tmp_path):
    path = tmp_path / "high.wav"
    sf.write(path, tone(11000.0, 1.0, 44100), 44100)  # above 8 kHz: must not alias into the 16 kHz output
    audio = load_audio(path)
    assert np.sqrt(np.mean(audio**2)) < 0.01


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(300.0, 1.0, 16000), tone(1000.0, 1.0, 16000, amplitude=0.2)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_24")
    audio = load_audio(path)
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_array_input_downmix_and_resample(layout):
    left, right = tone(200.0, 0.5, 8000), np.zeros(4000, np.float32)
    stacked = np.stack([left, right], axis=1 if layout == "channels_last" else 0)
    audio = load_audio(stacked, 8000)
    assert audio.size == 8000
    assert abs(peak_frequency(audio, SAMPLE_RATE) - 200.0) < 3.0
    assert abs(np.abs(audio).max() - 0.25) < 0.02  # mean of a 0.5 tone and silence


def test_integer_array_is_scaled():
    pcm = (tone(500.0, 0.25, 16000) * 32767).astype(np.int16)
    audio = load_audio(pcm, 16000)
    np.testing.assert_allclose(audio, pcm / 32768.0, atol=1e-6)


def test_ogg_is_read(tmp_path):
    path = tmp_path / "t.ogg"
    sf.write(path, tone(600.0, 1.0, 16000), 16000, format="OGG", subtype="VORBIS")
    audio = load_audio(path)
    assert abs(audio.size - 16000) <= 1 and abs(peak_frequency(audio, SAMPLE_RATE) - 600.0) < 3.0


@pytest.mark.parametrize("suffix", [".raw", ".pcm"])
def test_raw_pcm_s16le_default(tmp_path, suffix):
    pcm = (tone(440.0, 0.5, 16000) * 20000).astype("<i2")
    path = tmp_path / f"clip{suffix}"
    pcm.tofile(path)
    np.testing.assert_allclose(load_audio(path), pcm / 32768.0, atol=1e-6)


def test_raw_pcm_with_other_rate_and_dtype(tmp_path):
    samples = tone(440.0, 1.0, 8000)
    path = tmp_path / "clip.raw"
    samples.astype("<f4").tofile(path)
    audio = load_audio(path, raw_sample_rate=8000, raw_dtype="float32")
    assert audio.size == 16000 and abs(peak_frequency(audio, SAMPLE_RATE) - 440.0) < 2.0


def test_file_sample_rate_argument_is_checked(tmp_path):
    path = tmp_path / "t.wav"
    sf.write(path, tone(440.0, 0.2, 22050), 22050)
    assert load_audio(path, 22050).size == load_audio(path).size
    with pytest.raises(AudioError, match="22050 Hz"):
        load_audio(path, 16000)


# ---- errors: each names the file and the fix ----------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="no such audio file") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(AudioError, match="not a regular file"):
        load_audio(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty \(0 bytes\)") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_corrupt_wav(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"RIFF" + np.random.default_rng(0).bytes(200))
    with pytest.raises(AudioError, match="corrupt or unreadable") as info:
        load_audio(path)
    assert str(path) in str(info.value) and "convert" in str(info.value)


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.txt", b"this is a text file, not audio\n" * 20),
        ("speech.wav", b"this is a text file renamed to .wav\n" * 20),
        ("video.mp4", b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(300)),
    ],
)
def test_unsupported_format(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AudioError, match="unsupported or unrecognised audio format") as info:
        load_audio(path)
    assert str(path) in str(info.value) and "ffmpeg" in str(info.value)


def test_zero_length_audio_file(tmp_path):
    path = tmp_path / "silence0.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    assert path.stat().st_size > 0  # a valid header, no samples
    with pytest.raises(AudioError, match="zero samples") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_zero_length_array():
    with pytest.raises(AudioError, match="array input.*zero samples"):
        load_audio(np.zeros(0, np.float32), 16000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_in_file(tmp_path, bad):
    samples = tone(440.0, 0.1, 16000)
    samples[100] = bad
    path = tmp_path / "bad.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or inf") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_non_finite_samples_in_array():
    samples = tone(440.0, 0.1, 16000)
    samples[:3] = np.nan
    with pytest.raises(AudioError, match="array input: 3 of 1600 samples are NaN or inf"):
        load_audio(samples, 16000)


def test_raw_byte_count_not_multiple_of_width(tmp_path):
    path = tmp_path / "odd.raw"
    path.write_bytes(bytes(1001))
    with pytest.raises(AudioError, match="1001 bytes is not a multiple of the 2-byte sample width") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    with pytest.raises(AudioError, match="4-byte"):
        load_audio(tmp_path / "odd.raw", raw_dtype="float32")


def test_raw_unknown_dtype(tmp_path):
    path = tmp_path / "x.pcm"
    path.write_bytes(bytes(100))
    with pytest.raises(AudioError, match="unknown raw_dtype 'int24'"):
        load_audio(path, raw_dtype="int24")


def test_array_errors():
    with pytest.raises(AudioError, match="pass sample_rate="):
        load_audio(np.zeros(100, np.float32))
    with pytest.raises(AudioError, match="sample rate must be positive"):
        load_audio(np.zeros(100, np.float32), 0)
    with pytest.raises(AudioError, match="channel axis"):
        load_audio(np.zeros((100, 100), np.float32), 16000)
    with pytest.raises(AudioError, match="shape"):
        load_audio(np.zeros((2, 2, 100), np.float32), 16000)
    with pytest.raises(AudioError, match="dtype"):
        load_audio(np.array(["a", "b"]), 16000)
    with pytest.raises(AudioError, match="path or a numpy array"):
        load_audio([0.0, 0.1], 16000)  # type: ignore[arg-type]


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


# ---- split_windows, duration_seconds ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 479_999, 480_000, 480_001, 1_234_567])
def test_split_windows_never_drops_samples(length):
    audio = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    windows = split_windows(audio, 30.0, 16000)
    assert len(windows) == -(-length // 480_000)
    assert all(0 < w.size <= 480_000 for w in windows)
    joined = np.concatenate(windows) if windows else np.zeros(0, np.float32)
    np.testing.assert_array_equal(joined, audio)


def test_split_windows_fractional_seconds_are_not_one_sample_short():
    windows = split_windows(np.zeros(33_600, np.float32), 0.7, 16000)
    assert [w.size for w in windows] == [11_200, 11_200, 11_200]


def test_split_windows_errors():
    with pytest.raises(ValueError, match="positive"):
        split_windows(np.zeros(10, np.float32), 0.0)
    with pytest.raises(ValueError, match="1-D"):
        split_windows(np.zeros((10, 2), np.float32))
    with pytest.raises(ValueError, match="holds no sample"):
        split_windows(np.zeros(10, np.float32), 1e-6)


def test_duration_seconds():
    assert duration_seconds(np.zeros(24_000, np.float32)) == 1.5
    assert duration_seconds(np.zeros(22_050, np.float32), 22_050) == 1.0
    with pytest.raises(ValueError):
        duration_seconds(np.zeros(10), 0)
