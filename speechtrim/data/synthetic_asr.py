"""The embedded held-out synthetic ASR set: varied English sentences spoken by flite and festival voices. SYNTHETIC.

The sentences are not those of the synthetic emotion set, so a projector trained there is tested on unseen words.
flite and festival voices are used (Whisper recognises them at WER 0.07-0.15); espeak-ng is left out as it is hard
to recognise (DESIGN.md section 4). Rendered once into the cache, in a folder named by the recipe's hash; every
result computed on it must say synthetic.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
VOICES = (("flite", "slt"), ("flite", "rms"), ("flite", "awb"), ("festival", "kal_diphone"), ("flite", "kal16"),
          ("festival", "cmu_us_slt_arctic_hts"))


@dataclass(frozen=True)
class SyntheticASRRecipe:
    """What to render; the recipe's hash names the cache folder.

    Args:
        sentences: how many of ``SENTENCES`` to use (1-16).
        voices_per_sentence: voices speaking each sentence (1-6), rotating through ``VOICES``.
    """

    sentences: int = 16
    voices_per_sentence: int = 2
    version: int = 1

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
    folder = cache_root() / f"synthetic-asr-{recipe.key()}"
    if not (folder / "manifest.jsonl").is_file():
        _render(recipe, folder)
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
