"""Training of the embedded speech LLM: Whisper base -> pool x4 -> vocabulary projector -> SmolLM2-135M-Instruct.

The encoder stays frozen. The projector (``VocabProjector``: outputs in SmolLM2's embedding space, a CTC head over
SmolLM2's own tokens) trains first alone by CTC, then together with LoRA matrices on SmolLM2 by the next-token loss
(CTC kept as an auxiliary term); the LoRA is merged into the LLM when the model is loaded. Two tasks at once:
- transcription of synthetic English sentences (``load_synthetic_asr_train``: every usable Debian fortune
  sentence, rendered twice by training voices with seeded speed, pitch and noise);
- emotion recognition on the synthetic emotion set rendered with other jitter seeds than the held-out one (the
  held-out set has the same voices and sentences: only the prosody draws differ).
Encoder frames come from packed 30 s windows (``speechtrim.train.packing``), cached on disk.

Evaluation is on held-out data only: the held-out synthetic ASR set (other sentences, other voices), the 10 real
pocketsphinx clips, and the default synthetic emotion set (the same voices and sentences as training, new prosody
draws). Everything here is SYNTHETIC except the pocketsphinx clips.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from speechtrim.assets.cache import cache_root, write_json_atomic
from speechtrim.models.joint_decoding import Decoding, check_decoding
from speechtrim.models.storage import trained_state
from speechtrim.models.vocab_projector import VocabProjector
from speechtrim.precision import check_precision
from speechtrim.train.hearing import (StageConfig, ctc_speller, ctc_stage, ctc_token_ids, joint_stage, summary_stage,
                                      summary_word_stage)
from speechtrim.train.trainer import TrainItem, seed_everything

logger = logging.getLogger(__name__)

TRAINING_FILE = "training.json"


@dataclass
class EmbeddedRecipe:
    """What the embedded model is trained on and how.

    Args:
        encoder: Whisper name.
        llm: LLM name.
        pool: encoder frames stacked per audio token (4: 12.5 tokens per second).
        asr_sentences: training sentences of the synthetic ASR training set (None: every usable fortune sentence).
        asr_seeds: one rendering of the fortune sentences per seed, each with its own voices, speeds, pitches and
            noise (with every sentence in use, each seed speaks all of them; with fewer, each seed draws its own).
        wordnet_sentences: WordNet example sentences rendered once beside the fortunes (0: none, what the packaged
            model was trained on). The 5,067 fortune sentences leave 6 % of the held-out synthetic words and 11 %
            of the real clips' words outside the projector's vocabulary (the tokens of the training transcripts):
            the CTC head cannot emit them.
        wordnet_seed: seed of that rendering (its sentence draw, voices, prosody and noise).
        neural_seeds: one more rendering of the fortune sentences per seed, about half of its clips spoken by the
            neural voices (``SyntheticASRTrainRecipe`` ``neural_voices``: Kokoro's five, four of them female, and
            piper's joe), beside the renderings of ``asr_seeds`` (empty: none, what the packaged model was trained
            on). A seed may also be in ``asr_seeds``: the two renderings differ. Added to one Debian rendering, one
            such rendering took the CTC head's whole-set WER from 0.371 to 0.289 on the held-out synthetic voices
            (real speech 0.352 both; BENCHMARKS.md); in place of half of it, it did nothing (0.375).
        emotion_seeds: jitter seeds of the synthetic emotion training set, one rendering each, a fresh prosody draw
            per seed (the held-out set uses the default, 0). One rendering of 288 clips is what the packaged model
            was trained on; a LoRA fine-tune on it reached training loss 0.03 and held-out accuracy 0.56. The gap is
            mostly packing, not data: these clips are encoded packed, held-out clips alone (see
            ``summary_emotion_seeds``, whose clips are encoded alone).
        emotion_voices: voices per language of the emotion training set.
        emotion_sentences: sentences per language of the emotion training set.
        emotion_repeat: times each emotion clip appears in the joint stage's pool of examples.
        projector_hidden: width of the vocabulary projector's MLP.
        prosody_rank: rank of the projector's residual path (what the text does not carry).
        projector_context: Transformer layers over the projector's per-position outputs before the CTC head
            scores them (``VocabProjector`` ``context_layers``; 0: the frame-wise MLP alone, what the packaged
            model has).
        ctc_max_piece: the CTC head's targets spelled in LLM tokens of at most this many characters
            (``ctc_speller``; None: the LLM's own tokenisation, what the packaged model has). Fewer, more frequent
            targets and almost no held-out word out of reach; the LLM has to learn to read the finer spelling.
        ctc_whole_count: with ``ctc_max_piece``, the words whose own LLM tokens each occur this often in the
            training transcripts keep them (the others are spelled in pieces).
        lora_rank: rank of the LoRA matrices on every linear layer of the LLM (0: the LLM stays frozen).
        lora_alpha: LoRA scaling numerator.
        gap_seconds: silence between clips packed into one encoder window.
        ctc: stage 1 (CTC head alone).
        joint: stage 2 (LM loss + CTC through the LLM with LoRA).
        balance: stage 3 (None: none), the same loss on batches where emotion clips hold
            ``balance_emotion_share`` of the rows. With the token-mean loss a one- or two-token emotion answer
            carries about 1 % of a mixed batch's token-mean loss against the transcripts' dozens of tokens, so after
            the joint stage the emotion task is near chance; this short stage restores it while the transcription
            rows keep the ASR skill. (Averaging per row from the joint stage on, ``lm_reduction="rows"``, with six
            emotion renderings and the prosody path at 3e-3 was tried: at joint step 90 the held-out WER was
            0.78 / 1.30 against 0.34 / 0.46 for this recipe at step 75, so it was stopped. A stage 3 alone with the
            prosody path at 3e-3 and six emotion renderings, tried on the packaged model, lifted held-out emotion
            from 0.33 to 0.60 in 50 steps and broke transcription, WER 0.25 -> 0.50 synthetic and 0.36 -> 0.96 real:
            a per-frame term strong enough to carry the prosody corrupts what the LLM reads of the words.)
        balance_emotion_share: share of emotion rows in stage 3.
        summary_tokens: vectors of the projector's utterance summary (``UtteranceSummary``: how the utterance is
            said, placed after the audio span where no reducer removes it); 0: none.
        summary_hidden: width of the summary's per-frame features.
        summary_words: stage 4a (None: none), the summary alone taught to name each emotion clip's label (cross-
            entropy over the LLM's vocabulary; no LLM in the loop, seconds).
        summary: stage 4b (None: no summary at all), the LM loss with the summary where the prompt asks for it
            (``<audio_summary>``: the emotion prompt), training the summary and the LoRA matrices (``lora_lr``), on
            emotion clips (``summary_emotion_share`` of the rows) and transcription clips (no summary). The LLM
            does not read the summary by itself: with the embedding of the true label word placed after the
            audio, the LoRA-tuned model of stages 1-3 scored 0.27 on 48 held-out emotion clips, 0.33 without it.
            With the summary in every prompt this stage broke transcription (real WER 1.04 after 60 steps).
        summary_emotion_seeds: jitter seeds of the emotion renderings stage 4 trains on (never the held-out one,
            none of ``emotion_seeds``), each clip encoded alone as at inference.
        summary_emotion_share: share of emotion rows in stage 4.
        eval_clips: held-out transcription clips scored at every evaluation of the joint stage (learning curve).
        eval_emotion_clips: held-out emotion clips scored there too (0: none).
        eval_beams: beams of the final held-out evaluation's transcripts (1: greedy). The learning-curve probes
            stay greedy.
        eval_ctc_weight: with ``eval_beams`` >= 2, the CTC head's weight in choosing among the LLM's beams
            (``SpeechLM.generate(..., ctc_weight=)``; 0: the LLM's best beam).
        precision: the frozen encoder's and LLM's matrix products in training ("float32", or "bfloat16" under
            autocast: ``speechtrim.precision``), set on every stage (``StageConfig.precision``) and used to
            encode the training clips (cached apart from float32 frames). The model is evaluated and saved in
            float32 either way. On this project's 2-core AMX machine bfloat16 took the recipe from 128 to 78-103 min
            (two seeds, two days); the packaged model is the 78-minute run's (``--precision bfloat16 --seed 1``:
            held-out real WER 0.297, emotion 0.941, against float32 seed 0's 0.286 and 0.938). Without bfloat16
            units in the CPU it is slower than float32: the default stays float32.
    """

    encoder: str = "base"
    llm: str = "smollm2-135m"
    pool: int = 4
    asr_sentences: int | None = None
    asr_seeds: tuple[int, ...] = (0, 1)
    wordnet_sentences: int = 0
    wordnet_seed: int = 1
    neural_seeds: tuple[int, ...] = ()
    emotion_seeds: tuple[int, ...] = (1,)
    emotion_voices: int = 3
    emotion_sentences: int = 4
    emotion_repeat: int = 4
    projector_hidden: int = 1024
    prosody_rank: int = 32
    projector_context: int = 0
    ctc_max_piece: int | None = None
    ctc_whole_count: int = 10
    lora_rank: int = 8
    lora_alpha: float = 16.0
    gap_seconds: float = 1.0
    ctc: StageConfig = field(default_factory=lambda: StageConfig(
        steps=1500, batch_size=32, lr=2e-3, warmup=50, checkpoint_every=100, time_mask=0.1))
    joint: StageConfig = field(default_factory=lambda: StageConfig(
        steps=450, batch_size=16, lr=1e-4, lora_lr=1e-3, warmup=30, ctc_weight=1.0, checkpoint_every=50,
        evaluate_every=75))
    balance: StageConfig | None = field(default_factory=lambda: StageConfig(
        steps=100, batch_size=16, lr=1e-4, lora_lr=5e-4, warmup=10, ctc_weight=1.0, checkpoint_every=25))
    balance_emotion_share: float = 0.75
    summary_tokens: int = 2
    summary_hidden: int = 256
    summary: StageConfig | None = field(default_factory=lambda: StageConfig(
        steps=60, batch_size=8, lr=1e-3, lora_lr=1e-4, warmup=10, ctc_weight=0.0, summary_weight=1.0,
        checkpoint_every=30, evaluate_every=30))
    summary_emotion_share: float = 0.4
    summary_words: StageConfig | None = field(default_factory=lambda: StageConfig(
        steps=400, batch_size=64, lr=3e-3, warmup=20, checkpoint_every=100))
    summary_emotion_seeds: tuple[int, ...] = (2, 3, 4, 5)
    eval_clips: int = 8
    eval_emotion_clips: int = 48
    eval_beams: int = 4
    eval_ctc_weight: float = 0.5
    precision: str = "float32"

    def __post_init__(self) -> None:
        from speechtrim.data.synthetic_emotion import SyntheticEmotionRecipe

        check_precision(self.precision)
        for name in ("ctc", "joint", "balance", "summary", "summary_words"):
            stage = getattr(self, name)
            if stage is not None and stage.precision != self.precision:
                setattr(self, name, replace(stage, precision=self.precision))

        if not self.emotion_seeds or len(set(self.emotion_seeds)) != len(self.emotion_seeds):
            raise ValueError(f"emotion_seeds must be distinct seeds, at least one, got {self.emotion_seeds!r}")
        if not self.summary_emotion_seeds or len(set(self.summary_emotion_seeds)) != len(self.summary_emotion_seeds):
            raise ValueError(f"summary_emotion_seeds must be distinct seeds, at least one, got "
                             f"{self.summary_emotion_seeds!r}")
        if set(self.summary_emotion_seeds) & set(self.emotion_seeds):
            raise ValueError(f"summary_emotion_seeds {self.summary_emotion_seeds} must differ from emotion_seeds "
                             f"{self.emotion_seeds}: the summary's clips are encoded alone, the joint stage's packed")
        if SyntheticEmotionRecipe().seed in self.summary_emotion_seeds:
            raise ValueError(f"emotion seed {SyntheticEmotionRecipe().seed} renders the held-out emotion set; "
                             "use other seeds in summary_emotion_seeds")
        if not isinstance(self.summary_tokens, int) or self.summary_tokens < 0:
            raise ValueError(f"summary_tokens must be an int >= 0 (0: no summary), got {self.summary_tokens!r}")
        if self.summary is not None and not self.summary_tokens:
            raise ValueError("a summary stage needs summary_tokens >= 1 (or summary=None)")
        if not 0.0 < self.summary_emotion_share < 1.0:
            raise ValueError(f"summary_emotion_share must be in (0, 1), got {self.summary_emotion_share}")
        if SyntheticEmotionRecipe().seed in self.emotion_seeds:
            raise ValueError(f"emotion seed {SyntheticEmotionRecipe().seed} renders the held-out emotion set; "
                             "use other seeds")
        if self.asr_sentences is not None and (not isinstance(self.asr_sentences, int) or self.asr_sentences < 1):
            raise ValueError(f"asr_sentences must be None (all) or an int >= 1, got {self.asr_sentences!r}")
        check_decoding(self.eval_beams, self.eval_ctc_weight)
        for name in ("emotion_repeat", "projector_hidden", "pool", "eval_clips"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.projector_context, int) or self.projector_context < 0:
            raise ValueError(f"projector_context must be an int >= 0 (0: none), got {self.projector_context!r}")
        if self.ctc_max_piece is not None and (not isinstance(self.ctc_max_piece, int) or self.ctc_max_piece < 1):
            raise ValueError(f"ctc_max_piece must be None (the LLM's own tokens) or an int >= 1, got "
                             f"{self.ctc_max_piece!r}")
        if not isinstance(self.ctc_whole_count, int) or self.ctc_whole_count < 1:
            raise ValueError(f"ctc_whole_count must be an int >= 1, got {self.ctc_whole_count!r}")
        if not isinstance(self.wordnet_sentences, int) or self.wordnet_sentences < 0:
            raise ValueError(f"wordnet_sentences must be an int >= 0 (0: none), got {self.wordnet_sentences!r}")
        for name in ("asr_seeds", "neural_seeds"):
            seeds = getattr(self, name)
            if len(set(seeds)) != len(seeds) or not all(isinstance(seed, int) for seed in seeds):
                raise ValueError(f"{name} must be distinct integer seeds, got {seeds!r}")
        if not self.asr_seeds and not self.neural_seeds:
            raise ValueError("asr_seeds and neural_seeds are both empty: give at least one rendering of the fortunes")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0 (0: frozen LLM), got {self.lora_rank!r}")


def training_data(model: Any, recipe: EmbeddedRecipe, progress: bool = True,
                  summary_only: bool = False) -> tuple[list[TrainItem], dict[int, list[TrainItem]], dict]:
    """Transcription examples, emotion examples by jitter seed (those of ``emotion_seeds``, and of
    ``summary_emotion_seeds`` when there is a summary stage), encoder frames from packed windows cached on disk, and
    a description.

    The projector's vocabulary is set here: the LLM token ids of every training transcript (``ctc_speller``).

    Args:
        model: the SpeechLM whose encoder makes the frames.
        recipe: what to render.
        progress: show progress bars.
        summary_only: only what the summary stage uses (its emotion seeds and its draw of transcription clips,
            in the order ``_summary_pool`` takes them): the rest is neither rendered into frames nor returned.
    """
    from speechtrim.assets.whisper import whisper_cache_dir
    from speechtrim.data.synthetic_asr import SyntheticASRTrainRecipe, load_synthetic_asr_train
    from speechtrim.data.synthetic_emotion import SyntheticEmotionRecipe, load_synthetic_emotion
    from speechtrim.prompts import ASR_PROMPT, EMOTION_ANSWER_PREFIX, emotion_prompt
    from speechtrim.train.encoder_cache import EncoderCache
    from speechtrim.train.packing import encode_packed

    timings: dict[str, float] = {}
    started = time.perf_counter()
    asr_recipes = [SyntheticASRTrainRecipe(sentences=recipe.asr_sentences, seed=seed) for seed in recipe.asr_seeds]
    asr_recipes += [SyntheticASRTrainRecipe(sentences=recipe.asr_sentences, seed=seed, neural_voices=True)
                    for seed in recipe.neural_seeds]
    if recipe.wordnet_sentences:
        asr_recipes.append(SyntheticASRTrainRecipe(sentences=recipe.wordnet_sentences, text="wordnet",
                                                   seed=recipe.wordnet_seed))
    if summary_only and recipe.summary is None:
        raise ValueError("summary_only needs a recipe with a summary stage")
    seeds = [] if summary_only else list(recipe.emotion_seeds)
    seeds += [seed for seed in (recipe.summary_emotion_seeds if recipe.summary else ()) if seed not in seeds]
    emotion_recipes = [SyntheticEmotionRecipe(voices_per_language=recipe.emotion_voices,
                                              sentences_per_language=recipe.emotion_sentences, seed=seed)
                       for seed in seeds]
    all_asr = [clip for asr_recipe in asr_recipes for clip in load_synthetic_asr_train(asr_recipe)]
    emotion_sets = [load_synthetic_emotion(emotion_recipe) for emotion_recipe in emotion_recipes]
    emotion = [example for emotion_set in emotion_sets for example in emotion_set.examples]
    asr = all_asr
    if summary_only:
        summary_rows = len(recipe.summary_emotion_seeds) * len(emotion_sets[0].examples)
        asr = [all_asr[i] for i in _summary_asr_rows(len(all_asr), summary_rows, recipe)]
    timings["render_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    seed_of = [seed for seed, emotion_set in zip(seeds, emotion_sets) for _ in emotion_set.examples]
    # the summary's clips are encoded alone, as at inference: statistics over a clip's frames differ between a clip
    # packed among others and a clip alone in its window (a linear probe of them, trained on packed clips: 0.96 on
    # packed held-out clips, 0.70 on held-out clips encoded alone)
    alone = [seed not in recipe.emotion_seeds for seed in seed_of]
    cache = EncoderCache(model, whisper_cache_dir(recipe.encoder).name + f"-packed-gap{recipe.gap_seconds:g}",
                         precision=recipe.precision)
    packed = asr + [example for example, solo in zip(emotion, alone) if not solo]
    frames = encode_packed(model, [clip.audio_path for clip in packed], cache, gap_seconds=recipe.gap_seconds,
                           progress=progress)
    solo_frames = iter(EncoderCache(model, whisper_cache_dir(recipe.encoder).name, precision=recipe.precision).get(
        [example.audio_path for example, solo in zip(emotion, alone) if solo], progress=progress))
    timings["encode_seconds"] = round(time.perf_counter() - started, 1)
    asr_frames, packed_emotion = frames[: len(asr)], iter(frames[len(asr) :])
    emotion_frames = [next(solo_frames) if solo else next(packed_emotion) for solo in alone]
    whole: set[int] = set()
    if recipe.ctc_max_piece is not None:
        counts = Counter(token for clip in all_asr for token in ctc_token_ids(model.tokenizer, clip.text))
        whole = {token for token, count in counts.items() if count >= recipe.ctc_whole_count}
    spell = ctc_speller(model.tokenizer, recipe.ctc_max_piece, whole)
    vocab = sorted({token for clip in all_asr for token in spell(clip.text)})
    token_ids = [spell(clip.text) for clip in asr]
    index = {token: position for position, token in enumerate(vocab)}
    labels = list(emotion_sets[0].labels)
    asr_examples = [TrainItem(f, ASR_PROMPT, clip.text, "", torch.tensor([index[t] for t in ids]))
                    for f, clip, ids in zip(asr_frames, asr, token_ids)]
    emotion_examples: dict[int, list[TrainItem]] = {seed: [] for seed in seeds}
    for f, example, seed in zip(emotion_frames, emotion, seed_of):
        label_token = model.tokenizer(" " + example.label, add_special_tokens=False).input_ids[0]
        emotion_examples[seed].append(TrainItem(f, emotion_prompt(example.text, labels), " " + example.label,
                                                EMOTION_ANSWER_PREFIX, summary_target=label_token))
    description = {"asr": {"renderings": [asdict(asr_recipe) for asr_recipe in asr_recipes], "clips": len(asr),
                           "summary_only": summary_only,
                           "synthetic": True,
                           "audio_hours": round(sum(len(f) for f in asr_frames) / 50 / 3600, 2)},
                   "emotion": {"renderings": [asdict(emotion_recipe) for emotion_recipe in emotion_recipes],
                               "clips": len(emotion), "repeat": recipe.emotion_repeat, "labels": labels,
                               "joint_seeds": list(recipe.emotion_seeds),
                               "summary_seeds": list(recipe.summary_emotion_seeds) if recipe.summary else [],
                               "synthetic": True},
                   "vocabulary": len(vocab), "packing": {"gap_seconds": recipe.gap_seconds}, **timings}
    return asr_examples, emotion_examples, {"vocab_ids": vocab, **description}


@torch.no_grad()
def evaluate(model: Any, limit: int | None = None, batch_size: int = 8, progress: bool = True, beams: int = 1,
             ctc_weight: float = 0.0) -> dict[str, dict]:
    """Held-out scores of a SpeechLM, unreduced: synthetic ASR WER, pocketsphinx WER, synthetic emotion accuracy.

    Args:
        model: a SpeechLM.
        limit: at most this many clips per set (spread over the set).
        batch_size: clips per forward pass.
        progress: show progress bars.
        beams: beams of the transcripts (1: greedy).
        ctc_weight: the CTC head's weight in choosing among the beams (``SpeechLM.generate``); 0: the LLM alone.
    """
    from tqdm.auto import tqdm

    from speechtrim.eval.harness import load_eval_set, task_scores

    decoding = Decoding(beams, ctc_weight).as_dict()  # refuses what cannot run
    options = decoding if beams > 1 else {}  # generate()'s own defaults are greedy
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
                outputs += model.generate(batch, max_new_tokens=48, **options)
        scores = task_scores(evalset.task, [item.reference for item in evalset.items], outputs)
        results[spec] = {"task": evalset.task, "clips": len(evalset), "synthetic": evalset.synthetic, **scores,
                         **({} if evalset.candidates else {"decoding": decoding}),
                         "examples": [{"reference": item.reference, "output": output}
                                      for item, output in list(zip(evalset.items, outputs))[:3]]}
        logger.info("%s: %s", spec, {k: v for k, v in scores.items()})
    return results


def train_embedded(recipe: EmbeddedRecipe, out: Path, work: Path | None = None, command: str = "",
                   progress: bool = True, eval_limit: int | None = None, init: Path | None = None) -> dict[str, Any]:
    """Train the embedded model (vocabulary projector + LoRA + utterance summary), evaluate it on held-out data and
    save it to ``out``.

    Stages: render the training sets, encode them in packed windows (both cached), CTC stage, joint stage, balance
    stage, summary stage, held-out evaluation. ``out`` gets the weights (``save_trained``: float16 safetensors +
    speechlm.json) and ``training.json`` (command, recipe, data, per-stage history with the learning curve, stage
    times, held-out scores, versions). An interrupted run started again with the same ``work`` folder resumes from
    its last checkpoint with the same batches.

    Args:
        recipe: data and optimisation settings.
        out: folder for the trained model.
        work: folder for the checkpoints (default: the speechtrim cache).
        command: the command line, recorded in training.json.
        progress: show progress bars.
        eval_limit: clips per held-out set in the final evaluation (None: all).
        init: a model saved by an earlier run of this recipe's first three stages (its training.json says so):
            start from it and run only the summary stage. Its history and stage times are carried into the new
            training.json, so the times still add up to the whole training.
    """
    from speechtrim.models.storage import build_speechlm, load_speechlm, save_trained

    started = time.perf_counter()
    seed_everything(recipe.joint.seed)
    earlier = _earlier_training(init, recipe) if init is not None else None
    if earlier is not None:
        model = load_speechlm(init, merge=False)
    else:
        model = build_speechlm(recipe.encoder, recipe.llm, "none", pool=recipe.pool, seed=recipe.joint.seed)
    model.system_prompt = ""  # no system turn: SmolLM2's template would otherwise add its own
    asr, emotion, data = training_data(model, recipe, progress, summary_only=earlier is not None)
    vocab_ids = data.pop("vocab_ids")
    embeddings = model.llm.get_input_embeddings().weight
    if earlier is not None:
        if model.projector.vocab_ids.tolist() != vocab_ids:
            raise ValueError(f"{init} was trained on other transcripts (its vocabulary differs from this "
                             "recipe's); train from scratch without --init")
    else:
        params = {"hidden": recipe.projector_hidden, "prosody_rank": recipe.prosody_rank,
                  "embedding_std": float(embeddings.std())}
        if recipe.projector_context:
            params["context_layers"] = recipe.projector_context
        torch.manual_seed(recipe.joint.seed)
        model.use_projector(VocabProjector(model.pool * int(model.encoder.config.d_model), embeddings.shape[1],
                                           vocab_ids, **params), "vocab", params)
    work = Path(work) if work is not None else cache_root() / "embedded-training"
    work.mkdir(parents=True, exist_ok=True)
    probe = _held_out_probe(model, recipe.eval_clips, recipe.eval_emotion_clips)
    stage_seconds: dict[str, float] = {}
    if earlier is not None:
        history = {name: earlier["history"].get(name, []) for name in ("ctc", "ctc_probe", "joint", "balance")}
        stage_seconds = {name: earlier["stage_seconds"][name] for name in ("ctc", "joint", "balance")
                         if name in earlier["stage_seconds"]}
    else:
        history = _word_stages(model, recipe, asr, emotion, work, probe, stage_seconds, progress)
    history["summary"] = []
    if recipe.summary is not None:
        torch.manual_seed(recipe.summary.seed)
        model.add_summary(recipe.summary_tokens, recipe.summary_hidden)
        stage_started = time.perf_counter()
        pool = _summary_pool(asr, emotion, recipe, drawn=earlier is not None)
        history["summary_words"] = []
        if recipe.summary_words is not None:
            history["summary_words"] = summary_word_stage(model, pool, recipe.summary_words,
                                                          checkpoint=work / "summary-words.ckpt", progress=progress)
            logger.info("after the summary's word stage: %s", history["summary_words"][-1])
        history["summary"] = summary_stage(model, pool, recipe.summary,
                                           checkpoint=work / "summary.ckpt", evaluate=probe, progress=progress)
        stage_seconds["summary"] = _stage_seconds(history["summary"], stage_started)
    stage_started = time.perf_counter()
    scores = evaluate(model, eval_limit, progress=progress, beams=recipe.eval_beams,
                      ctc_weight=recipe.eval_ctc_weight)
    stage_seconds["evaluate"] = round(time.perf_counter() - stage_started, 1)
    report = _report(model, recipe, command, data, scores, started, stage_seconds, history)
    if earlier is not None:
        report["init"] = {"from": str(init), "command": earlier.get("command"),
                          "stages": sorted(name for name in ("ctc", "joint", "balance") if name in stage_seconds),
                          "total_seconds": earlier.get("total_seconds")}
    save_trained(model, out,  # LoRA matrices saved unmerged (small); load_speechlm merges them
                 {"task": "asr+emotion", "labels": data["emotion"]["labels"], "synthetic_training": True},
                 dtype=torch.float16)
    write_json_atomic(Path(out) / TRAINING_FILE, report)
    return report


def _word_stages(model: Any, recipe: EmbeddedRecipe, asr: list[TrainItem], emotion: dict[int, list[TrainItem]],
                 work: Path, probe: Any, stage_seconds: dict[str, float], progress: bool) -> dict[str, Any]:
    """Stages 1-3 (CTC, joint, balance): what the words pass through; returns their history."""
    joint_emotion = [item for seed in recipe.emotion_seeds for item in emotion[seed]]
    stage_started = time.perf_counter()
    logger.info("CTC stage on %d transcription clips (vocabulary %d tokens)", len(asr), len(model.projector.vocab_ids))
    ctc_history = ctc_stage(model, asr, recipe.ctc, checkpoint=work / "ctc.ckpt", progress=progress)
    stage_seconds["ctc"] = _stage_seconds(ctc_history, stage_started)
    ctc_scores = probe(ctc_only=True)
    logger.info("after the CTC stage: %s", ctc_scores)
    if recipe.lora_rank:
        model.add_lora(rank=recipe.lora_rank, alpha=recipe.lora_alpha)
    stage_started = time.perf_counter()
    examples = asr + joint_emotion * recipe.emotion_repeat
    joint_history = joint_stage(model, examples, recipe.joint, checkpoint=work / "joint.ckpt",
                                evaluate=probe, progress=progress)
    stage_seconds["joint"] = _stage_seconds(joint_history, stage_started)
    balance_history: list[dict] = []
    if recipe.balance is not None:
        stage_started = time.perf_counter()
        balance_history = joint_stage(model, _balanced(asr, joint_emotion, recipe), recipe.balance,
                                      checkpoint=work / "balance.ckpt", evaluate=probe, progress=progress,
                                      name="balance")
        stage_seconds["balance"] = _stage_seconds(balance_history, stage_started)
    return {"ctc": ctc_history, "ctc_probe": ctc_scores, "joint": joint_history, "balance": balance_history}


SUMMARY_FIELDS = ("summary_tokens", "summary_hidden", "summary_words", "summary", "summary_emotion_seeds",
                  "summary_emotion_share")
"""Recipe fields of the summary stage alone: a model trained by the first three stages of a recipe that differs
only in these can start it (``init``)."""
UNCHECKED_FIELDS = ("eval_clips", "eval_emotion_clips", "eval_beams", "eval_ctc_weight")


def _earlier_training(init: Path, recipe: EmbeddedRecipe) -> dict[str, Any]:
    """The training.json of ``init``, checked to come from this recipe's first three stages (nothing else)."""
    path = Path(init) / TRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--init {init}: no {TRAINING_FILE} there; it must be a folder written by "
                                "train-embedded")
    earlier = json.loads(path.read_text())
    if earlier.get("history", {}).get("summary"):
        raise ValueError(f"--init {init}: that model already has a trained summary stage")
    ours = _jsonable(asdict(recipe))
    theirs = _as_current(earlier.get("recipe", {}))
    differ = sorted(name for name in ours if name not in SUMMARY_FIELDS + UNCHECKED_FIELDS
                    and theirs.get(name) != ours[name])
    if differ:
        raise ValueError(f"--init {init} was trained with another recipe (differs in {differ}); only the summary "
                         "stage's settings may differ: train from scratch without --init")
    return earlier


def _report(model: Any, recipe: EmbeddedRecipe, command: str, data: dict, scores: dict, started: float,
            stage_seconds: dict[str, float], history: dict) -> dict[str, Any]:
    """training.json: command, recipe, data, per-stage history, held-out scores, stage times, machine."""
    return {
        "command": command, "recipe": _jsonable(asdict(recipe)), "data": data, "history": history,
        "held_out": scores, "stage_seconds": {"render": data["render_seconds"], "encode": data["encode_seconds"],
                                              **stage_seconds},
        "train_seconds": round(sum(stage_seconds[name] for name in ("ctc", "joint", "balance", "summary")
                                   if name in stage_seconds), 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "trainable_params": sum(t.numel() for n, t in trained_state(model).items() if t.is_floating_point()),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": version("transformers")},
    }


def _as_current(recipe: dict[str, Any]) -> dict[str, Any]:
    """An older training.json's recipe in today's terms: ``emotion_seed`` became ``emotion_seeds``, and stage
    settings added since (e.g. ``prosody_lr``, ``lm_reduction``) take their defaults, which are what ran then."""
    from dataclasses import MISSING, fields

    recipe = dict(recipe)
    recipe.setdefault("wordnet_sentences", 0)  # added since; 0 (none) is what ran before
    recipe.setdefault("wordnet_seed", EmbeddedRecipe.wordnet_seed)
    recipe.setdefault("projector_context", 0)  # added since; 0 (none) is what ran before
    recipe.setdefault("neural_seeds", [])  # added since; the Debian voices alone ran before
    recipe.setdefault("ctc_max_piece", None)  # added since; the LLM's own tokenisation ran before
    recipe.setdefault("ctc_whole_count", EmbeddedRecipe.ctc_whole_count)
    recipe.setdefault("eval_beams", 1)  # added since; greedy transcripts were evaluated before
    recipe.setdefault("eval_ctc_weight", 0.0)
    recipe.setdefault("precision", "float32")  # added since; float32 ran before
    if "emotion_seed" in recipe and "emotion_seeds" not in recipe:
        recipe["emotion_seeds"] = [recipe.pop("emotion_seed")]
    defaults = {f.name: f.default for f in fields(StageConfig) if f.default is not MISSING}
    for name in ("ctc", "joint", "balance"):
        if isinstance(recipe.get(name), dict):
            recipe[name] = {**defaults, **recipe[name]}
    return recipe


def _summary_pool(asr: list[TrainItem], emotion: dict[int, list[TrainItem]], recipe: EmbeddedRecipe,
                  drawn: bool = False) -> list[TrainItem]:
    """Stage 4's pool: every emotion clip of ``summary_emotion_seeds`` once and a seeded draw of transcription
    clips, so that emotion rows are ``summary_emotion_share`` of it (``drawn``: ``asr`` is that draw already, as
    ``training_data(..., summary_only=True)`` returns it)."""

    emotion_rows = [item for seed in recipe.summary_emotion_seeds for item in emotion[seed]]
    if drawn:
        return emotion_rows + asr
    return emotion_rows + [asr[i] for i in _summary_asr_rows(len(asr), len(emotion_rows), recipe)]


def _summary_asr_rows(available: int, emotion_rows: int, recipe: EmbeddedRecipe) -> list[int]:
    """The transcription clips of stage 4's pool (sorted indices), so emotion rows are ``summary_emotion_share``."""
    import numpy as np

    share = recipe.summary_emotion_share
    count = min(available, round(emotion_rows * (1 - share) / share))
    seed = recipe.summary.seed if recipe.summary is not None else 0
    return sorted(np.random.default_rng(seed).choice(available, size=count, replace=False).tolist())


def _balanced(asr: list[TrainItem], emotion: list[TrainItem], recipe: EmbeddedRecipe) -> list[TrainItem]:
    """Stage 3's pool: every emotion clip three times and a seeded draw of transcription clips, so that emotion
    rows are ``balance_emotion_share`` of it."""
    import numpy as np

    share = recipe.balance_emotion_share
    if not 0.0 < share < 1.0:
        raise ValueError(f"balance_emotion_share must be in (0, 1), got {share}")
    emotion_rows = emotion * 3
    count = min(len(asr), round(len(emotion_rows) * (1 - share) / share))
    chosen = np.random.default_rng(recipe.balance.seed).choice(len(asr), size=count, replace=False)
    return emotion_rows + [asr[i] for i in sorted(chosen.tolist())]


def _stage_seconds(history: list[dict], started: float) -> float:
    """A stage's training time: its history's clock, which a resumed run carries on from the checkpoint, or this
    process's time when that is longer (evaluation calls included either way)."""
    recorded = 60 * float(history[-1]["minutes"]) if history else 0.0
    return round(max(recorded, time.perf_counter() - started), 1)


def _held_out_probe(model: Any, clips: int, emotion_clips: int = 0, batch_size: int = 8) -> Any:
    """A callback scoring ``clips`` held-out synthetic and up to ``clips`` real clips (WER of the LLM's transcripts,
    or of the CTC head's greedy output with ``ctc_only``) and ``emotion_clips`` held-out emotion clips (accuracy of
    the LLM's best-scored label; not with ``ctc_only``); encoder frames computed once."""
    from speechtrim.eval.harness import load_eval_set, task_scores

    sets = {}
    specs = [("synthetic-asr", "wer_synthetic", clips), ("pocketsphinx", "wer_real", clips)]
    if emotion_clips:
        specs.append(("synthetic-emotion", "emotion_accuracy", emotion_clips))
    for spec, name, limit in specs:
        evalset = load_eval_set(spec, limit)
        encoded = [model.encode([item.audio for item in evalset.items[start : start + batch_size]])
                   for start in range(0, len(evalset), batch_size)]
        sets[name] = (evalset, encoded)

    @torch.no_grad()
    def probe(ctc_only: bool = False) -> dict[str, float]:
        model.eval()
        scores = {}
        for name, (evalset, encoded) in sets.items():
            if ctc_only and evalset.candidates:
                continue
            outputs: list[str] = []
            for start, (frames, mask) in zip(range(0, len(evalset), batch_size), encoded):
                chunk = evalset.items[start : start + batch_size]
                embeds, embeds_mask, logits = model.project(frames, mask)
                if ctc_only:
                    outputs += model.ctc_decode(logits, embeds_mask.sum(dim=1))
                    continue
                batch = model.build_inputs([item.prompt for item in chunk], embeds, embeds_mask,
                                           assistant_prefix=[item.assistant_prefix for item in chunk],
                                           summary=model.summarize(frames, mask))
                if evalset.candidates:
                    best = model.score(batch, list(evalset.candidates)).argmax(dim=1).tolist()
                    outputs += [evalset.labels[i] for i in best]
                else:
                    outputs += model.generate(batch, max_new_tokens=48)
            result = task_scores(evalset.task, [item.reference for item in evalset.items], outputs)
            value = result["accuracy"] if evalset.candidates else result["wer"]
            scores[("ctc_" if ctc_only else "") + name] = round(float(value), 4)
        return scores

    return probe


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def reevaluate(folder: Path, beams: int, ctc_weight: float, command: str = "", limit: int | None = None,
               progress: bool = True, write: bool = False) -> dict[str, Any]:
    """Score a model saved by ``train_embedded`` on the held-out sets again with other decoding settings.

    With ``write``, its training.json gets the new scores as ``held_out`` (and the decoding in ``recipe``), and
    what they replace goes to ``evaluations``, with the command and time of each evaluation, so the record says
    which decoding every figure came from; the weights are not touched. Returns the new scores.
    """
    from speechtrim.models.storage import load_speechlm

    check_decoding(beams, ctc_weight)  # before the model loads
    folder = Path(folder)
    path = folder / TRAINING_FILE
    if write and not path.is_file():
        raise FileNotFoundError(f"{folder} has no {TRAINING_FILE} to update: give a folder written by "
                                "train-embedded, or leave out --write")
    if write and limit is not None:
        raise ValueError("--write records scores on the whole held-out sets: leave out --limit")
    model = load_speechlm(folder)  # with the system prompt it was trained with (speechlm.json)
    started = time.perf_counter()
    scores = evaluate(model, limit, progress=progress, beams=beams, ctc_weight=ctc_weight)
    seconds = round(time.perf_counter() - started, 1)
    if write:
        report = json.loads(path.read_text())
        recipe = _as_current(report.get("recipe", {}))
        previous = {"command": report.get("command"), "decoding": {"num_beams": recipe["eval_beams"],
                                                                    "ctc_weight": recipe["eval_ctc_weight"]},
                    "seconds": report.get("stage_seconds", {}).get("evaluate"), "held_out": report["held_out"]}
        evaluations = report.get("evaluations") or [previous]
        evaluations.append({"command": command, "decoding": {"num_beams": beams, "ctc_weight": ctc_weight},
                            "seconds": seconds, "held_out": scores})
        report["evaluations"] = evaluations
        report["held_out"] = scores
        report["recipe"] = {**report.get("recipe", {}), "eval_beams": beams, "eval_ctc_weight": ctc_weight}
        write_json_atomic(path, report)
    return scores


__all__ = ["EmbeddedRecipe", "check_decoding", "evaluate", "reevaluate", "train_embedded", "training_data"]
