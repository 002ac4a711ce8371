"""Synthetic English ASR sets. SYNTHETIC.

- The held-out set (``load_synthetic_asr``): 16 hand-written sentences spoken by three voices (flite slt and rms,
  festival's HTS slt). The embedded model is tested here, so none of these sentences or voices is trained on.
- The training set (``load_synthetic_asr_train``): short English sayings from Debian's ``fortunes`` package (never
  one of the held-out sentences) spoken by the other flite and festival voices and espeak-ng, with seeded speed and
  pitch variation.

Whisper recognises the flite and festival voices at WER 0.07-0.15. Both sets are rendered once into the cache, in a
folder named by the recipe's hash; every result computed on them must say synthetic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import soundfile
from tqdm.auto import tqdm

from speechtrim.assets.cache import atomic_dir, cache_root
from speechtrim.synth import synthesize

logger = logging.getLogger(__name__)

SENTENCES = (
    "Please close the door when you leave the office.",
    "The weather will be cold and windy on Friday.",
    "My sister bought a new bicycle last summer.",
    "He forgot his umbrella at the train station.",
    "The children are playing football in the park.",
    "Turn left at the next corner and walk straight ahead.",
    "Our flight was delayed by almost two hours.",
    "She reads the newspaper every morning with coffee.",
    "The museum opens at ten and closes at six.",
    "Could you send me the report before lunch?",
    "A small dog was sleeping under the wooden bench.",
    "They are building a new bridge across the river.",
    "I would like a cup of tea with some milk.",
    "The doctor asked him to rest for a few days.",
    "We need more chairs for the meeting this afternoon.",
    "The garden looks beautiful after the spring rain.",
)
# (engine, voice); the i-th sentence is spoken by voice i mod len(VOICES) and the next one
VOICES = (("flite", "slt"), ("flite", "rms"), ("festival", "cmu_us_slt_arctic_hts"))
# Training voices: disjoint from VOICES. (engine, voice, language)
TRAIN_VOICES = (("flite", "awb", "en"), ("flite", "kal16", "en"), ("flite", "kal", "en"),
                ("festival", "kal_diphone", "en"), ("espeak-ng", "m3", "en"), ("espeak-ng", "f2", "en"))

# Training text: Debian's ``fortunes`` package (short English sayings, public domain), from these files only.
FORTUNES_FOLDER = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("cookie", "fortunes", "education", "food", "people", "pets", "platitudes", "wisdom", "work",
                 "miscellaneous", "science", "sports", "literature", "kids", "love", "humorists")
_SPEAKABLE = re.compile(r"[A-Z][A-Za-z ,']*[a-z][.!?]")


def fortune_sentences(folder: Path = FORTUNES_FOLDER) -> list[str]:
    """Every speakable sentence of the fortune files: plain words (no digits, abbreviations or shouting), 5 to 16
    words, sorted; none of them is a held-out sentence."""
    if not folder.is_dir():
        raise FileNotFoundError(f"the ASR training sentences come from Debian's fortunes package, not found in "
                                f"{folder}: install it (apt-get install fortunes; scripts/setup.sh does)")
    held_out = {sentence.lower() for sentence in SENTENCES}
    sentences: set[str] = set()
    for name in FORTUNE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        for fortune in path.read_text(encoding="latin-1").split("\n%\n"):
            text = " ".join(fortune.split("--")[0].split())  # drop "-- Author" attributions
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                words = sentence.split()
                if (_SPEAKABLE.fullmatch(sentence) and 5 <= len(words) <= 16 and sentence.lower() not in held_out
                        and not any(len(word) > 1 and word.strip(",.!?").isupper() for word in words)):
                    sentences.add(sentence)
    if not sentences:
        raise ValueError(f"no usable sentence in the fortune files of {folder}")
    return sorted(sentences)


def training_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct training sentences drawn (seeded) from ``fortune_sentences``; none is held out."""
    import numpy as np

    available = fortune_sentences()
    if not 1 <= count <= len(available):
        raise ValueError(f"count must be between 1 and {len(available)} (the usable fortune sentences), got {count}")
    order = np.random.default_rng(seed).permutation(len(available))[:count]
    return [available[i] for i in order]


@dataclass(frozen=True)
class SyntheticASRRecipe:
    """What to render; the recipe's hash names the cache folder.

    Args:
        sentences: how many of ``SENTENCES`` to use (1-16).
        voices_per_sentence: voices speaking each sentence (1-6), rotating through ``VOICES``.
    """

    sentences: int = 16
    voices_per_sentence: int = 2
    version: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.sentences <= len(SENTENCES):
            raise ValueError(f"sentences must be in [1, {len(SENTENCES)}], got {self.sentences}")
        if not 1 <= self.voices_per_sentence <= len(VOICES):
            raise ValueError(f"voices_per_sentence must be in [1, {len(VOICES)}], got {self.voices_per_sentence}")

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + json.dumps([SENTENCES, VOICES])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class SyntheticClip:
    """One rendered sentence: ``synthetic`` is always True."""

    id: str
    audio_path: Path
    text: str
    voice: str
    synthetic: bool = True


def load_synthetic_asr(recipe: SyntheticASRRecipe = SyntheticASRRecipe()) -> list[SyntheticClip]:
    """Render the set once into the cache (a few seconds) and return its clips.

    Args:
        recipe: sentences and voices to render.
    """
    return _rendered_clips(cache_root() / f"synthetic-asr-{recipe.key()}", lambda folder: _render(recipe, folder))


def _rendered_clips(folder: Path, render: Callable[[Path], None]) -> list[SyntheticClip]:
    """The clips of a rendered set, rendering it into ``folder`` first when its manifest is missing."""
    if not (folder / "manifest.jsonl").is_file():
        render(folder)
    clips = []
    with open(folder / "manifest.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            clips.append(SyntheticClip(row["id"], folder / row["audio"], row["transcript"], row["voice"]))
    return clips


def _render(recipe: SyntheticASRRecipe, folder: Path) -> None:
    jobs = [(index, VOICES[(index + offset) % len(VOICES)]) for index in range(recipe.sentences)
            for offset in range(recipe.voices_per_sentence)]
    with atomic_dir(folder) as staging:
        (staging / "audio").mkdir()
        rows = []
        for index, (engine, voice) in tqdm(jobs, desc="rendering synthetic ASR set", unit="clip"):
            speech = synthesize(SENTENCES[index], engine=engine, voice=voice)
            clip_id = f"{index:02d}_{engine}-{voice}"
            soundfile.write(staging / "audio" / f"{clip_id}.wav", speech.audio, speech.sample_rate, subtype="PCM_16")
            rows.append({"id": clip_id, "audio": f"audio/{clip_id}.wav", "transcript": SENTENCES[index],
                         "voice": f"{engine}:{voice}", "synthetic": True})
        with open(staging / "manifest.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    logger.info("rendered %d synthetic ASR clips into %s", len(jobs), folder)


@dataclass(frozen=True)
class SyntheticASRTrainRecipe:
    """The training set: fortune sentences, each spoken by one training voice with seeded speed and pitch.

    Args:
        sentences: how many distinct sentences (each rendered once).
        seed: seed of the sentences, the voice choice and the prosody.
        speed_range: speaking-rate factors drawn uniformly in this range.
        pitch_semitones: pitch shift drawn uniformly in +- this.
    """

    sentences: int = 1000
    seed: int = 0
    speed_range: tuple[float, float] = (0.85, 1.2)
    pitch_semitones: float = 2.0
    version: int = 1

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + json.dumps([TRAIN_VOICES, FORTUNE_FILES])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_synthetic_asr_train(recipe: SyntheticASRTrainRecipe = SyntheticASRTrainRecipe()) -> list[SyntheticClip]:
    """Render the training set once into the cache and return its clips (disjoint from ``load_synthetic_asr``)."""
    return _rendered_clips(cache_root() / f"synthetic-asr-train-{recipe.key()}",
                           lambda folder: _render_train(recipe, folder))


def _render_train(recipe: SyntheticASRTrainRecipe, folder: Path) -> None:
    import numpy as np

    from speechtrim.synth import Prosody

    rng = np.random.default_rng(recipe.seed)
    sentences = training_sentences(recipe.sentences, recipe.seed)
    with atomic_dir(folder) as staging:
        (staging / "audio").mkdir()
        rows = []
        for index, sentence in enumerate(tqdm(sentences, desc="rendering synthetic ASR training set", unit="clip")):
            engine, voice, language = TRAIN_VOICES[int(rng.integers(len(TRAIN_VOICES)))]
            prosody = Prosody(speed=float(rng.uniform(*recipe.speed_range)),
                              pitch=float(rng.uniform(-recipe.pitch_semitones, recipe.pitch_semitones)))
            speech = synthesize(sentence, engine=engine, voice=voice, language=language, prosody=prosody,
                                seed=recipe.seed)
            clip_id = f"{index:04d}_{engine}-{voice}"
            soundfile.write(staging / "audio" / f"{clip_id}.wav", speech.audio, speech.sample_rate, subtype="PCM_16")
            rows.append({"id": clip_id, "audio": f"audio/{clip_id}.wav", "transcript": sentence,
                         "voice": f"{engine}:{voice}", "prosody": asdict(prosody), "synthetic": True})
        with open(staging / "manifest.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    logger.info("rendered %d synthetic ASR training clips into %s", len(rows), folder)
