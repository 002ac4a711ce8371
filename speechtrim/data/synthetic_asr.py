"""Synthetic English ASR sets. SYNTHETIC.

- The held-out set (``load_synthetic_asr``): 16 hand-written sentences spoken by three voices (flite slt and rms,
  festival's HTS slt). The embedded model is tested here, so none of these sentences or voices is trained on.
- The training set (``load_synthetic_asr_train``): short English sayings from Debian's ``fortunes`` package, or the
  example sentences of WordNet's glosses (Debian's ``wordnet-base``: 26,057 usable everyday sentences, about
  25,000 distinct words), never one of the held-out sentences, spoken by the other flite and festival voices and espeak-ng, with
  seeded speed and pitch variation.

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

import numpy as np
import soundfile
from tqdm.auto import tqdm

from speechtrim.assets.cache import atomic_dir, cache_root
from speechtrim.data.clip import Clip
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
# Training voices: disjoint from VOICES. (engine, voice, language, sampling weight). espeak-ng is hard to recognise
# (Whisper WER 0.4-0.57) and gets a smaller share.
TRAIN_VOICES = (("flite", "awb", "en", 4), ("flite", "kal16", "en", 4), ("flite", "kal", "en", 3),
                ("festival", "kal_diphone", "en", 4), ("espeak-ng", "m3", "en", 1), ("espeak-ng", "f2", "en", 1),
                ("espeak-ng", "f1", "en", 1), ("espeak-ng", "f4", "en", 1), ("espeak-ng", "m1", "en", 1))
# The neural voices (``neural_voices=True``), beside TRAIN_VOICES: Kokoro-82M's five (four female: every Debian
# training voice is male or robotic, while two held-out voices are female) and piper's joe.
NEURAL_TRAIN_VOICES = tuple(("kokoro", voice, "en", 3) for voice in
                            ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")) + \
    (("piper", "joe", "en", 4),)

# Training text: Debian's ``fortunes`` package (short English sayings, public domain), from these files only.
FORTUNES_FOLDER = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("cookie", "fortunes", "education", "food", "people", "pets", "platitudes", "wisdom", "work",
                 "miscellaneous", "science", "sports", "literature", "kids", "love", "humorists")
_SPEAKABLE = re.compile(r"[A-Z][A-Za-z ,']*[a-z][.!?]")
# Second training text: the example sentences quoted in WordNet 3.0's glosses (Debian's wordnet-base; Princeton's
# WordNet licence: use, copy and distribute with its notice), e.g. "the children played in the park".
WORDNET_FOLDER = Path("/usr/share/wordnet")
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_WORDNET_EXAMPLE = re.compile(r"[A-Za-z][A-Za-z ,']*[A-Za-z]")
TEXTS = ("fortunes", "wordnet")


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


def wordnet_sentences(folder: Path = WORDNET_FOLDER) -> list[str]:
    """Every speakable example sentence of WordNet's glosses: plain words (no digits, dashes or abbreviations), 5 to
    16 words, first letter capitalised and a full stop added, sorted; none of them is a held-out sentence."""
    if not all((folder / name).is_file() for name in WORDNET_FILES):
        raise FileNotFoundError(f"the WordNet training sentences come from Debian's wordnet-base package, not found in "
                                f"{folder}: install it (apt-get install wordnet-base; scripts/setup.sh does)")
    held_out = {_plain(sentence) for sentence in SENTENCES}
    sentences: set[str] = set()
    for name in WORDNET_FILES:
        for line in (folder / name).read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:  # the licence header, or a synset without a gloss
                continue
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                words = example.split()
                if (_WORDNET_EXAMPLE.fullmatch(example) and 5 <= len(words) <= 16 and _plain(example) not in held_out
                        and not any(len(word) > 1 and word.strip(",").isupper() for word in words)):
                    sentences.add(example[0].upper() + example[1:] + ".")
    if not sentences:
        raise ValueError(f"no usable example sentence in the WordNet files of {folder}")
    return sorted(sentences)


def _plain(sentence: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]+", " ", sentence.lower()).split())


def text_sentences(text: str) -> list[str]:
    """The usable sentences of a training text: "fortunes" (``fortune_sentences``) or "wordnet"
    (``wordnet_sentences``)."""
    if text not in TEXTS:
        raise ValueError(f"unknown training text {text!r}; choose one of {TEXTS}")
    return fortune_sentences() if text == "fortunes" else wordnet_sentences()


def training_sentences(count: int, seed: int = 0, text: str = "fortunes") -> list[str]:
    """``count`` distinct training sentences drawn (seeded) from ``text``'s sentences (``text_sentences``); none is
    held out."""
    import numpy as np

    available = text_sentences(text)
    if not 1 <= count <= len(available):
        raise ValueError(f"count must be between 1 and {len(available)} (the usable {text} sentences), got {count}")
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


def load_synthetic_asr(recipe: SyntheticASRRecipe = SyntheticASRRecipe()) -> list[Clip]:
    """Render the set once into the cache (a few seconds) and return its clips.

    Args:
        recipe: sentences and voices to render.
    """
    return _rendered_clips(cache_root() / f"synthetic-asr-{recipe.key()}", lambda folder: _render(recipe, folder))


def _rendered_clips(folder: Path, render: Callable[[Path], None]) -> list[Clip]:
    """The clips of a rendered set, rendering it into ``folder`` first when its manifest is missing."""
    if not (folder / "manifest.jsonl").is_file():
        render(folder)
    clips = []
    with open(folder / "manifest.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            clips.append(Clip(folder / row["audio"], text=row["transcript"], speaker=row["voice"], synthetic=True, id=row["id"]))
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
    """The training set: fortune (or WordNet) sentences, each spoken by one training voice with seeded speed, pitch
    and noise.

    The training voices are male (flite, festival) or espeak-ng's robotic variants, while two held-out voices are
    female: a pitch range reaching well above the voices' own (up to +7 semitones) gives the set higher voices.

    Args:
        sentences: how many distinct sentences (each rendered once); None takes every usable sentence of ``text``.
        text: where the sentences come from, "fortunes" or "wordnet" (``text_sentences``).
        seed: seed of the sentences, the voice choice, the prosody and the noise.
        speed_range: speaking-rate factors drawn uniformly in this range.
        pitch_range: pitch shift in semitones drawn uniformly in this range.
        noise_fraction: share of the clips that get white noise added.
        snr_db_range: signal-to-noise ratio of that noise, drawn uniformly in this range (dB).
        neural_voices: draw the voices from ``NEURAL_TRAIN_VOICES`` too (Kokoro and piper, ``pip install
            'speechtrim[voices]'``), about half of the clips; False: the Debian voices only.
    """

    sentences: int | None = None
    text: str = "fortunes"
    seed: int = 0
    speed_range: tuple[float, float] = (0.8, 1.25)
    pitch_range: tuple[float, float] = (-3.0, 7.0)
    noise_fraction: float = 0.3
    snr_db_range: tuple[float, float] = (15.0, 35.0)
    neural_voices: bool = False
    version: int = 2

    def __post_init__(self) -> None:
        if self.sentences is not None and (not isinstance(self.sentences, int) or self.sentences < 1):
            raise ValueError(f"sentences must be None (all) or an int >= 1, got {self.sentences!r}")
        if not 0.0 <= self.noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1], got {self.noise_fraction}")
        if self.text not in TEXTS:
            raise ValueError(f"text must be one of {TEXTS}, got {self.text!r}")
        if not isinstance(self.neural_voices, bool):
            raise ValueError(f"neural_voices must be True or False, got {self.neural_voices!r}")

    @property
    def voices(self) -> tuple[tuple[str, str, str, int], ...]:
        """(engine, voice, language, sampling weight) of every voice this recipe draws from."""
        return TRAIN_VOICES + (NEURAL_TRAIN_VOICES if self.neural_voices else ())

    def key(self) -> str:
        fields = asdict(self)
        if self.text == "fortunes":  # the fortune sets rendered before ``text`` existed keep their cache folder
            del fields["text"]
        if not self.neural_voices:  # nor do the sets rendered before ``neural_voices`` existed
            del fields["neural_voices"]
        text = json.dumps(fields, sort_keys=True) + json.dumps([self.voices, FORTUNE_FILES if self.text == "fortunes"
                                                                  else WORDNET_FILES])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_synthetic_asr_train(recipe: SyntheticASRTrainRecipe = SyntheticASRTrainRecipe(),
                             workers: int = 2) -> list[Clip]:
    """Render the training set once into the cache and return its clips (disjoint from ``load_synthetic_asr``).

    Args:
        recipe: what to render.
        workers: synthesis processes run at once (the clips do not depend on it).
    """
    return _rendered_clips(cache_root() / f"synthetic-asr-train-{recipe.key()}",
                           lambda folder: _render_train(recipe, folder, workers))


def _render_train(recipe: SyntheticASRTrainRecipe, folder: Path, workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from speechtrim.synth import Prosody

    rng = np.random.default_rng(recipe.seed)
    available = len(text_sentences(recipe.text))
    sentences = training_sentences(available if recipe.sentences is None else recipe.sentences, recipe.seed,
                                   recipe.text)
    voices = recipe.voices
    if recipe.neural_voices:
        require_neural_engines()  # before any rendering
    weights = np.array([weight for *_, weight in voices])
    jobs = []  # every random draw happens here, in order, so the set does not depend on the worker count
    for index, sentence in enumerate(sentences):
        engine, voice, language, _ = voices[int(rng.choice(len(voices), p=weights / weights.sum()))]
        prosody = Prosody(speed=float(rng.uniform(*recipe.speed_range)), pitch=float(rng.uniform(*recipe.pitch_range)))
        snr_db = float(rng.uniform(*recipe.snr_db_range)) if rng.random() < recipe.noise_fraction else None
        jobs.append((index, sentence, engine, voice, language, prosody, snr_db, int(rng.integers(2**31))))

    def render(job: tuple) -> dict:
        index, sentence, engine, voice, language, prosody, snr_db, noise_seed = job
        speech = synthesize(sentence, engine=engine, voice=voice, language=language, prosody=prosody,
                            seed=recipe.seed)
        audio = speech.audio
        if snr_db is not None:
            audio = add_noise(audio, snr_db, np.random.default_rng(noise_seed))
        clip_id = f"{index:04d}_{engine}-{voice}"
        soundfile.write(staging / "audio" / f"{clip_id}.wav", audio, speech.sample_rate, subtype="PCM_16")
        return {"id": clip_id, "audio": f"audio/{clip_id}.wav", "transcript": sentence, "voice": f"{engine}:{voice}",
                "prosody": asdict(prosody), "snr_db": snr_db, "synthetic": True}

    with atomic_dir(folder) as staging:
        (staging / "audio").mkdir()
        with ThreadPoolExecutor(max(1, workers)) as pool:
            rows = list(tqdm(pool.map(render, jobs), total=len(jobs), desc="rendering synthetic ASR training set",
                             unit="clip"))
        with open(staging / "manifest.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    logger.info("rendered %d synthetic ASR training clips into %s", len(rows), folder)


def require_neural_engines() -> None:
    """FileNotFoundError naming the install command unless the neural voices' engines (kokoro, piper) are
    installed."""
    from speechtrim import synth

    missing = sorted(set(synth.NEURAL_ENGINES) - set(synth.available_engines()))
    if missing:
        raise FileNotFoundError(f"neural_voices needs the engines {missing}, not installed: {synth.VOICES_EXTRA}")


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio`` plus white noise at ``snr_db`` dB below the clip's mean power, clipped to [-1, 1]."""
    power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-10
    noise = rng.standard_normal(len(audio)) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)
