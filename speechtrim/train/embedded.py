"""Training of the embedded speech LLM: Whisper base -> pooled linear projector -> SmolLM2-135M-Instruct.

Encoder and LLM stay frozen; only the projector trains (the length adapter is ``none``), on two tasks at once:
- transcription of synthetic English sentences (``load_synthetic_asr_train``: fortune sentences, training voices);
- emotion recognition on the synthetic emotion set rendered with another seed than the held-out one.

Evaluation is on held-out data only: the held-out synthetic ASR set (other sentences, other voices), the 10 real
pocketsphinx clips, and the default synthetic emotion set (the same voices and sentences as training, new prosody
draws). Everything here is SYNTHETIC except the pocketsphinx clips.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from speechtrim.assets.cache import cache_root, write_json_atomic
from speechtrim.train.trainer import TrainConfig, TrainItem, fit, seed_everything

logger = logging.getLogger(__name__)

TRAINING_FILE = "training.json"


@dataclass
class EmbeddedRecipe:
    """What the embedded model is trained on and how.

    Args:
        encoder: Whisper name.
        llm: LLM name.
        pool: encoder frames stacked per audio token (4: 12.5 tokens per second).
        asr_sentences: training sentences of the synthetic ASR training set.
        emotion_seed: jitter seed of the synthetic emotion training set (the held-out set uses the default, 0).
        emotion_voices: voices per language of the emotion training set.
        emotion_sentences: sentences per language of the emotion training set.
        emotion_repeat: times each emotion clip appears per epoch. An emotion answer is one or two tokens against a
            transcript's dozen, so without repeats the emotion task gets a few per cent of the gradient.
        train: optimisation settings.
    """

    encoder: str = "base"
    llm: str = "smollm2-135m"
    pool: int = 4
    asr_sentences: int = 1000
    emotion_seed: int = 1
    emotion_voices: int = 3
    emotion_sentences: int = 4
    emotion_repeat: int = 3
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, batch_size=8, grad_accum=1, lr=1e-2, lr_schedule="linear", group_by_length=True))

    def __post_init__(self) -> None:
        from speechtrim.data.synthetic_emotion import SyntheticEmotionRecipe

        if self.emotion_seed == SyntheticEmotionRecipe().seed:
            raise ValueError(f"emotion_seed {self.emotion_seed} renders the held-out emotion set; use another seed")
        for name in ("asr_sentences", "emotion_repeat"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")


def training_items(model: Any, recipe: EmbeddedRecipe, progress: bool = True) -> tuple[list[TrainItem], dict]:
    """The multitask training examples (encoder frames cached on disk) and a description of the data."""
    from speechtrim.assets.whisper import whisper_cache_dir
    from speechtrim.data.synthetic_asr import SyntheticASRTrainRecipe, load_synthetic_asr_train
    from speechtrim.data.synthetic_emotion import SyntheticEmotionRecipe, load_synthetic_emotion
    from speechtrim.prompts import ASR_PROMPT, EMOTION_ANSWER_PREFIX, emotion_prompt
    from speechtrim.train.encoder_cache import EncoderCache

    asr_recipe = SyntheticASRTrainRecipe(sentences=recipe.asr_sentences)
    emotion_recipe = SyntheticEmotionRecipe(voices_per_language=recipe.emotion_voices,
                                            sentences_per_language=recipe.emotion_sentences, seed=recipe.emotion_seed)
    asr = load_synthetic_asr_train(asr_recipe)
    emotion = load_synthetic_emotion(emotion_recipe)
    cache = EncoderCache(model, whisper_cache_dir(recipe.encoder).name)
    asr_frames = cache.get([clip.audio_path for clip in asr], progress=progress)
    emotion_frames = cache.get([example.audio_path for example in emotion.examples], progress=progress)
    labels = list(emotion.labels)
    items = [TrainItem(frames, ASR_PROMPT, clip.text, assistant_prefix="") for frames, clip in zip(asr_frames, asr)]
    items += [TrainItem(frames, emotion_prompt(example.transcript, labels), " " + example.label,
                        assistant_prefix=EMOTION_ANSWER_PREFIX)
              for frames, example in zip(emotion_frames, emotion.examples)] * recipe.emotion_repeat
    description = {"asr": {**asdict(asr_recipe), "clips": len(asr), "synthetic": True},
                   "emotion": {**asdict(emotion_recipe), "clips": len(emotion), "repeat": recipe.emotion_repeat,
                             "labels": labels, "synthetic": True}}
    return items, description


@torch.no_grad()
def evaluate(model: Any, limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict[str, dict]:
    """Held-out scores of a SpeechLM, unreduced: synthetic ASR WER, pocketsphinx WER, synthetic emotion accuracy.

    Args:
        model: a SpeechLM.
        limit: at most this many clips per set (spread over the set).
        batch_size: clips per forward pass.
        progress: show progress bars.
    """
    from tqdm.auto import tqdm

    from speechtrim.eval.harness import load_eval_set, task_scores

    model.eval()
    results: dict[str, dict] = {}
    for spec in ("synthetic-asr", "pocketsphinx", "synthetic-emotion"):
        evalset = load_eval_set(spec, limit)
        outputs: list[str] = []
        for start in tqdm(range(0, len(evalset), batch_size), desc=f"evaluating {spec}", unit="batch",
                          disable=not progress, leave=False):
            chunk = evalset.items[start : start + batch_size]
            batch = model.prepare([item.audio for item in chunk], [item.prompt for item in chunk],
                                  assistant_prefix=[item.assistant_prefix for item in chunk])
            if evalset.candidates:
                scores = model.score(batch, evalset.candidates)  # (b, C)
                outputs += [evalset.labels[i] for i in scores.argmax(dim=1).tolist()]
            else:
                outputs += model.generate(batch, max_new_tokens=48)
        scores = task_scores(evalset.task, [item.reference for item in evalset.items], outputs)
        results[spec] = {"task": evalset.task, "clips": len(evalset), "synthetic": evalset.synthetic, **scores,
                         "examples": [{"reference": item.reference, "output": output}
                                      for item, output in list(zip(evalset.items, outputs))[:3]]}
        logger.info("%s: %s", spec, {k: v for k, v in scores.items()})
    return results


def train_embedded(recipe: EmbeddedRecipe, out: Path, work: Path | None = None, command: str = "",
                   progress: bool = True, eval_limit: int | None = None) -> dict[str, Any]:
    """Train the embedded model's projector, evaluate it on held-out data and save it to ``out``.

    ``out`` gets the weights (``save_trained``: safetensors + speechlm.json) and ``training.json`` (command, recipe,
    seed, data description, per-epoch loss, held-out scores, time, versions). An interrupted run started again with
    the same ``work`` folder resumes after its last finished epoch.

    Args:
        recipe: data and optimisation settings.
        out: folder for the trained model.
        work: folder for the checkpoint (default: the speechtrim cache).
        command: the command line, recorded in training.json.
        progress: show progress bars.
        eval_limit: clips per held-out set (None: all).
    """
    from importlib.metadata import version

    from speechtrim.hf.speechlm import build_speechlm, save_trained

    started = time.perf_counter()
    seed_everything(recipe.train.seed)
    model = build_speechlm(recipe.encoder, recipe.llm, "none", pool=recipe.pool, seed=recipe.train.seed)
    model.system_prompt = ""  # no system turn: SmolLM2's template would otherwise add its own
    model.recipe["system_prompt"] = ""
    items, data = training_items(model, recipe, progress)
    work = Path(work) if work is not None else cache_root() / "embedded-training"
    work.mkdir(parents=True, exist_ok=True)
    logger.info("training the embedded projector on %d clips (%s)", len(items), work)
    train_started = time.perf_counter()
    history = fit(model, items, recipe.train, checkpoint=work / "embedded.ckpt", progress=progress)
    train_seconds = time.perf_counter() - train_started
    scores = evaluate(model, eval_limit, progress=progress)
    report = {
        "command": command, "recipe": _jsonable(asdict(recipe)), "data": data, "history": history,
        "held_out": scores, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "trainable_params": sum(p.numel() for p in model.projector.parameters()),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": version("transformers")},
    }
    save_trained(model, out, {"task": "asr+emotion", "labels": data["emotion"]["labels"], "synthetic_training": True})
    write_json_atomic(Path(out) / TRAINING_FILE, report)
    return report


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


__all__ = ["EmbeddedRecipe", "evaluate", "train_embedded", "training_items"]
