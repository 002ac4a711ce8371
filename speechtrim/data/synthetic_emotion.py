"""The embedded synthetic emotion set: the paper's six classes rendered as prosody patterns. SYNTHETIC.

Every class speaks the same sentences with the same voices, so the words carry no label: only the prosody does
(speed, pitch, loudness, each with seeded random jitter). Voices span English, Spanish, German and French
(espeak-ng variants, plus flite and festival for English). This is far easier than real emotional speech and every
result on it is labelled synthetic; real corpora (EmoDB, RAVDESS, manifests) load from a user's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile
from tqdm.auto import tqdm

from speechtrim.assets.cache import atomic_dir, cache_root
from speechtrim.data.clip import Clip
from speechtrim.data.emotion import PAPER_EMOTIONS, Dataset
from speechtrim.synth import Prosody, random_prosody, synthesize

logger = logging.getLogger(__name__)

# Base prosody of each class (speed factor, semitones, dB); jitter is added per clip.
EMOTION_PROSODY = {
    "angry": Prosody(speed=1.2, pitch=2.0, gain_db=6.0),
    "disgust": Prosody(speed=0.8, pitch=-2.0, gain_db=-2.0),
    "fear": Prosody(speed=1.4, pitch=6.0, gain_db=-6.0),
    "happy": Prosody(speed=1.1, pitch=5.0, gain_db=3.0),
    "neutral": Prosody(speed=1.0, pitch=0.0, gain_db=0.0),
    "sad": Prosody(speed=0.7, pitch=-5.0, gain_db=-8.0),
}

SENTENCES = {
    "en": ["The train leaves at nine tomorrow morning.", "I put the books on the kitchen table.",
           "We walked to the market after lunch.", "The meeting was moved to the other room.",
           "She opened the window and looked outside.", "They painted the fence last weekend."],
    "es": ["El tren sale mañana a las nueve.", "Puse los libros en la mesa de la cocina.",
           "Caminamos al mercado después de comer.", "La reunión se cambió a la otra sala.",
           "Ella abrió la ventana y miró afuera.", "Pintaron la valla el fin de semana pasado."],
    "de": ["Der Zug fährt morgen um neun Uhr ab.", "Ich habe die Bücher auf den Küchentisch gelegt.",
           "Wir sind nach dem Essen zum Markt gegangen.", "Das Treffen wurde in den anderen Raum verlegt.",
           "Sie öffnete das Fenster und schaute hinaus.", "Sie haben den Zaun letztes Wochenende gestrichen."],
    "fr": ["Le train part demain à neuf heures.", "J'ai posé les livres sur la table de la cuisine.",
           "Nous avons marché jusqu'au marché après le déjeuner.", "La réunion a été déplacée dans l'autre salle.",
           "Elle a ouvert la fenêtre et regardé dehors.", "Ils ont peint la clôture le week-end dernier."],
}

# (engine, voice, language) per language; the first N are used for voices_per_language=N.
VOICES = {
    "en": [("flite", "slt", "en"), ("espeak-ng", "m3", "en"), ("festival", "kal_diphone", "en"),
           ("flite", "rms", "en"), ("espeak-ng", "f2", "en")],
    "es": [("espeak-ng", "m1", "es"), ("espeak-ng", "f3", "es"), ("espeak-ng", "m4", "es"), ("espeak-ng", "f1", "es")],
    "de": [("espeak-ng", "m2", "de"), ("espeak-ng", "f2", "de"), ("espeak-ng", "m5", "de"), ("espeak-ng", "f4", "de")],
    "fr": [("espeak-ng", "m3", "fr"), ("espeak-ng", "f1", "fr"), ("espeak-ng", "m6", "fr"), ("espeak-ng", "f3", "fr")],
}


@dataclass(frozen=True)
class SyntheticEmotionRecipe:
    """What to render. The recipe's hash names the cache folder, so a changed recipe is rendered anew.

    Args:
        languages: language codes among ``SENTENCES``.
        voices_per_language: voices taken from ``VOICES`` for each language.
        sentences_per_language: sentences taken from ``SENTENCES`` (the same for every class).
        jitter: random prosody variation in [0, 1] around each class's pattern.
        seed: seed of the jitter.
    """

    languages: tuple[str, ...] = ("en", "es", "de", "fr")
    voices_per_language: int = 3
    sentences_per_language: int = 4
    jitter: float = 0.3
    seed: int = 0
    version: int = 1  # bump when the rendering itself changes

    def __post_init__(self) -> None:
        unknown = [code for code in self.languages if code not in SENTENCES]
        if unknown or not self.languages:
            raise ValueError(f"languages must be a non-empty subset of {sorted(SENTENCES)}, got {self.languages}")
        most_voices = min(len(VOICES[code]) for code in self.languages)
        if not 1 <= self.voices_per_language <= most_voices:
            raise ValueError(f"voices_per_language must be in [1, {most_voices}], got {self.voices_per_language}")
        if not 1 <= self.sentences_per_language <= 6:
            raise ValueError(f"sentences_per_language must be in [1, 6], got {self.sentences_per_language}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + json.dumps([EMOTION_PROSODY, SENTENCES, VOICES], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_synthetic_emotion(recipe: SyntheticEmotionRecipe = SyntheticEmotionRecipe()) -> Dataset:
    """Render the set once into the cache (a few seconds) and return it; speakers are the voices."""
    folder = cache_root() / f"synthetic-emotion-{recipe.key()}"
    if not (folder / "manifest.jsonl").is_file():
        _render(recipe, folder)
    examples = []
    with open(folder / "manifest.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            examples.append(
                Clip(folder / row["audio"], row["label"], row["transcript"], row["language"], row["speaker"],
                        synthetic=True, meta={"prosody": row["prosody"]})
            )
    return Dataset("synthetic-emotion", examples, PAPER_EMOTIONS, synthetic=True)


def _render(recipe: SyntheticEmotionRecipe, folder: Path) -> None:
    rng = np.random.default_rng(recipe.seed)
    jobs = [
        (label, code, voice, sentence_index)
        for code in recipe.languages
        for voice in VOICES[code][: recipe.voices_per_language]
        for sentence_index in range(recipe.sentences_per_language)
        for label in PAPER_EMOTIONS
    ]
    with atomic_dir(folder) as staging:
        (staging / "audio").mkdir()
        rows = []
        for number, (label, code, (engine, voice, language), sentence_index) in enumerate(
            tqdm(jobs, desc="rendering synthetic emotion set", unit="clip")
        ):
            prosody = random_prosody(rng, EMOTION_PROSODY[label], recipe.jitter)
            text = SENTENCES[code][sentence_index]
            speech = synthesize(text, engine=engine, voice=voice, language=language, prosody=prosody, seed=recipe.seed)
            name = f"audio/{number:05d}_{code}_{engine}-{voice}_{label}.wav"
            soundfile.write(staging / name, speech.audio, speech.sample_rate, subtype="PCM_16")
            rows.append({"audio": name, "label": label, "transcript": text, "language": code,
                         "speaker": f"{engine}:{voice}:{code}", "prosody": asdict(prosody), "synthetic": True})
        with open(staging / "manifest.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        with open(staging / "recipe.json", "w", encoding="utf-8") as handle:
            json.dump(asdict(recipe), handle, indent=2)
    logger.info("rendered %d synthetic emotion clips into %s", len(jobs), folder)
