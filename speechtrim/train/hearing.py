"""The two training stages that teach the embedded speech LLM to hear.

1. ``ctc_stage``: the ``VocabProjector`` alone learns, by CTC over the LLM's own token ids, to say which token each
   audio position carries. No LLM forward pass: cheap, and it aligns the audio to the LLM's embedding space.
2. ``joint_stage``: the LLM's next-token loss through the whole model (projector + LoRA matrices on the LLM), with
   the CTC loss kept as an auxiliary term on the transcription rows, on a mix of transcription and emotion examples.
3. ``summary_stage``: the same LM loss with the projector's utterance summary in the prompt (how the utterance is
   said: the emotion task), the summary and the LoRA matrices trained, the projector's per-frame path left alone.

Both are step-based with a batch schedule drawn up front from the seed, checkpoint atomically every
``checkpoint_every`` steps and on interruption (Ctrl-C, SIGTERM), and resume from the checkpoint with identical
batches. ``evaluate_every`` steps an optional callback records held-out scores against training minutes (the
learning curve in training.json).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from speechtrim.assets.cache import atomic_file
from speechtrim.models.vocab_projector import ctc_loss, ctc_text, ctc_token_ids
from speechtrim.precision import FrozenWeights, check_precision, compute_precision
from speechtrim.train.encoder_cache import pad_frames
from speechtrim.train.trainer import TrainItem

logger = logging.getLogger(__name__)


@dataclass
class StageConfig:
    """Optimisation settings of one stage.

    Args:
        steps: optimiser steps.
        batch_size: examples per step.
        lr: AdamW learning rate of the projector (warm-up, then cosine decay to 10 %).
        lora_lr: learning rate of the LoRA matrices (None: ``lr``).
        warmup: steps of linear warm-up.
        prosody_lr: learning rate of the projector's prosody path (None: ``lr``). The path starts at zero and gets
            no gradient in the CTC stage, so at the joint stage's small projector rate it barely moves.
        ctc_weight: weight of the CTC loss next to the LM loss (joint stage only).
        summary_weight: weight of the utterance summary's cross-entropy against the rows' ``summary_target``
            (summary stage only).
        lm_reduction: how the joint stage averages the LM loss ("tokens" or "rows", see ``SpeechLM.loss``).
        max_grad_norm: gradient clipping.
        checkpoint_every: steps between checkpoints.
        evaluate_every: steps between calls of the evaluation callback (0: never).
        time_mask: share of each clip's encoder frames zeroed in 100 ms spans (SpecAugment-style time masking on
            the cached features; CTC stage only), drawn from the seed and the step so a resumed run sees the same.
        feature_dropout: share of the encoder features' values zeroed (the rest scaled by 1 / (1 - share)), each
            value on its own, after the time masking (CTC stage only; drawn like ``time_mask``): against the CTC
            head learning its training voices (greedy WER 0.04 on them against 0.3-0.4 on held-out voices).
        seed: seed of the batch schedule.
        precision: "float32", or "bfloat16" for the forward pass under autocast (``compute_precision``): the
            weights, gradients and optimiser states stay float32.
    """

    steps: int
    batch_size: int
    lr: float
    lora_lr: float | None = None
    prosody_lr: float | None = None
    warmup: int = 20
    ctc_weight: float = 0.3
    summary_weight: float = 0.0
    lm_reduction: str = "tokens"
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    evaluate_every: int = 0
    time_mask: float = 0.0
    feature_dropout: float = 0.0
    seed: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "lora_lr", "prosody_lr"):
            value = getattr(self, name)
            if (value is not None or name == "lr") and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.lm_reduction not in ("tokens", "rows"):
            raise ValueError(f"lm_reduction must be 'tokens' or 'rows', got {self.lm_reduction!r}")
        if not 0.0 <= self.time_mask < 1.0:
            raise ValueError(f"time_mask must be in [0, 1), got {self.time_mask}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        check_precision(self.precision)


def ctc_speller(tokenizer: Any, max_piece: int | None = None, whole: Collection[int] = ()
                ) -> Callable[[str], list[int]]:
    """What the CTC head is trained to emit for a sentence: ``ctc_token_ids`` (``max_piece`` None), or every word of
    ``ctc_text(sentence)`` spelled in short LLM tokens, the longest one of at most ``max_piece`` characters at each
    step from left to right (the word's leading space counts as one character), except the words whose own tokens
    are all in ``whole`` (e.g. the tokens frequent in the training transcripts), which keep them.

    Short pieces are for a head that has little audio to learn from: over the 5,067 fortune sentences the LLM's own
    tokenisation uses 7,133 tokens, 6,509 of them fewer than 10 times, and 5.7 % of the held-out synthetic tokens
    never; the words whose tokens occur 10 times or more kept whole and the others spelled in pieces of at most 3
    characters need 2,193 tokens and miss 0.4 %, at 3.45 characters a token (about 5 tokens a second of speech,
    under half the audio positions' 12.5). Every piece is an LLM token, so the LLM still reads a posterior mix of
    its own embeddings, only spelled more finely than it tokenises.
    """
    if max_piece is None:
        return lambda sentence: ctc_token_ids(tokenizer, sentence)
    if not isinstance(max_piece, int) or max_piece < 1:
        raise ValueError(f"max_piece must be None (the LLM's own tokens) or an int >= 1, got {max_piece!r}")
    vocabulary = {piece: token for piece, token in tokenizer.get_vocab().items() if len(piece) <= max_piece}
    whole = set(whole)
    cache: dict[str, list[int]] = {}

    def spell_word(word: str) -> list[int]:
        if word not in cache:
            own = tokenizer(" " + word, add_special_tokens=False).input_ids
            if all(token in whole for token in own):
                cache[word] = own
                return own
            written = "".join(tokenizer.convert_ids_to_tokens(own))  # as the tokenizer writes it, e.g. "Ġword"
            ids, start = [], 0
            while start < len(written):
                end = next((end for end in range(min(len(written), start + max_piece), start, -1)
                            if written[start:end] in vocabulary), None)
                if end is None:
                    raise ValueError(f"the tokenizer has no token for {written[start]!r} of {word!r}: cannot spell it "
                                     f"in pieces of at most {max_piece} characters")
                ids.append(vocabulary[written[start:end]])
                start = end
            cache[word] = ids
        return cache[word]

    return lambda sentence: [token for word in ctc_text(sentence).split() for token in spell_word(word)]


def _lr_factor(step: int, config: StageConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _schedule(count: int, config: StageConfig) -> list[list[int]]:
    """Every step's example indices, drawn up front (epochs of seeded permutations) so a resumed run sees the same."""
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    while len(order) < config.steps * config.batch_size:
        order += rng.permutation(count).tolist()
    return [order[step * config.batch_size : (step + 1) * config.batch_size] for step in range(config.steps)]


class _Interrupted(Exception):
    pass


def _run_stage(name: str, model: torch.nn.Module, examples: list[TrainItem], config: StageConfig,
               loss_fn: Callable[[list[TrainItem], int], dict[str, torch.Tensor]], parameters: list[dict],
               checkpoint: Path | None, evaluate: Callable[[], dict[str, float]] | None,
               progress: bool) -> list[dict[str, float]]:
    """The shared loop: schedule, AdamW, warm-up + cosine, clipping, checkpoints, resume, evaluation callback."""
    from speechtrim.models.storage import trained_state

    if not examples:
        raise ValueError(f"the {name} stage needs at least one example")
    optimizer = torch.optim.AdamW(parameters, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history, start, spent = _resume_stage(name, model, optimizer, config, len(examples), checkpoint)
    trainable = [p for group in parameters for p in group["params"]]
    device = trainable[0].device if trainable else torch.device("cpu")

    def save(step: int, seconds: float) -> None:
        if checkpoint is None:
            return
        with atomic_file(checkpoint, mode="wb") as handle:
            torch.save({"model": trained_state(model), "optimizer": optimizer.state_dict(), "step": step,
                        "seconds": seconds, "history": history, "config": asdict(config),
                        "examples": len(examples)}, handle)

    def on_term(signum: int, frame: Any) -> None:
        if callable(previous):  # e.g. the CLI's handler, which records that it was SIGTERM before interrupting
            previous(signum, frame)
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    schedule = _schedule(len(examples), config)
    began = time.perf_counter() - spent
    running: dict[str, float] = {}
    completed = start  # steps whose optimiser update is done
    bar = tqdm(total=config.steps, initial=start, desc=f"{name} stage", unit="step", disable=not progress)
    llm = getattr(model, "llm", model)
    embeddings = llm.get_input_embeddings() if hasattr(llm, "get_input_embeddings") else None
    frozen = FrozenWeights(llm, config.precision, skip=(embeddings.weight,) if embeddings is not None else ())
    frozen.lower()  # the frozen LLM's matrices cast once for the stage, not by autocast at every step
    model.train()
    try:
        for step in range(start, config.steps):
            with compute_precision(config.precision, device, backward=True):
                losses = loss_fn([examples[i] for i in schedule[step]], step)
            total = losses["loss"]
            if not torch.isfinite(total):
                raise FloatingPointError(f"{name} stage: loss became {total.item()} at step {step + 1}; the last "
                                         f"checkpoint ({checkpoint}) is kept; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * _lr_factor(step, config)
            optimizer.step()
            completed = step + 1
            for key, value in losses.items():
                running[key] = running.get(key, 0.0) + float(value.detach())
            running["n"] = running.get("n", 0.0) + 1
            bar.update(1)
            bar.set_postfix({key: f"{value / running['n']:.3f}" for key, value in running.items() if key != "n"})
            done = step + 1
            if done % config.checkpoint_every == 0 or done == config.steps or (
                    config.evaluate_every and done % config.evaluate_every == 0):
                frozen.restore()  # evaluation and checkpoints see the float32 model
                history.append(_record(name, model, config, done, began, running, evaluate))
                running = {}
                save(done, time.perf_counter() - began)
                frozen.lower()
    except (KeyboardInterrupt, _Interrupted):
        bar.close()
        save(completed, time.perf_counter() - began)
        logger.warning("%s stage interrupted after step %d; the checkpoint %s resumes it", name, completed, checkpoint)
        raise KeyboardInterrupt from None
    finally:
        frozen.restore()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    bar.close()
    model.eval()
    return history


def _resume_stage(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: StageConfig,
                  examples: int, checkpoint: Path | None) -> tuple[list[dict[str, float]], int, float]:
    """History, first step and seconds already spent: from ``checkpoint`` (same settings and data only), or fresh."""
    if checkpoint is None or not checkpoint.is_file():
        return [], 0, 0.0
    state = torch.load(checkpoint, weights_only=False)
    if state["config"] != asdict(config) or state["examples"] != examples:
        raise ValueError(f"checkpoint {checkpoint} was made with other settings or data ({state['config']}, "
                         f"{state['examples']} examples); delete it or use another work folder")
    _load_trained(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("%s stage: resuming %s at step %d", name, checkpoint, state["step"])
    return state["history"], state["step"], state["seconds"]


def _record(name: str, model: torch.nn.Module, config: StageConfig, done: int, began: float,
            running: dict[str, float], evaluate: Callable[[], dict[str, float]] | None) -> dict[str, float]:
    """The history entry after ``done`` steps: mean losses since the last one, and the evaluation when due."""
    record = {"step": done, "minutes": round((time.perf_counter() - began) / 60, 2),
              **{key: round(value / running["n"], 4) for key, value in running.items() if key != "n"}}
    if evaluate is not None and config.evaluate_every and (done % config.evaluate_every == 0 or done == config.steps):
        record.update(evaluate())
        model.train()
    logger.info("%s stage: %s", name, record)
    return record


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _load_trained(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = {name: tensor for name, tensor in state.items() if not name.startswith("lora.")}
    model.load_state_dict(own, strict=False)
    lora = {name[len("lora."):]: tensor for name, tensor in state.items() if name.startswith("lora.")}
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.llm, lora)


def _padded(model: torch.nn.Module, batch: list[TrainItem]) -> tuple[torch.Tensor, torch.Tensor]:
    frames, mask = pad_frames([example.frames for example in batch])
    return frames.to(model.device), mask.to(model.device)


def time_masked(frames: torch.Tensor, mask: torch.Tensor, share: float, generator: torch.Generator,
                span: int = 5) -> torch.Tensor:
    """``frames`` (B, T, D) with about ``share`` of each row's valid frames zeroed in spans of ``span`` frames."""
    if share <= 0:
        return frames
    keep = torch.ones(frames.shape[:2], dtype=torch.bool)
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        spans = int(round(share * length / span))
        if spans and length > span:
            starts = torch.randint(0, length - span + 1, (spans,), generator=generator)
            for start in starts.tolist():
                keep[row, start : start + span] = False
    return frames * keep.unsqueeze(-1).to(frames.device, frames.dtype)


def feature_dropped(frames: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``frames`` with about ``share`` of its values zeroed and the others scaled by 1 / (1 - share) (inverted
    dropout), drawn from ``generator`` so that a resumed run sees the same."""
    if share <= 0:
        return frames
    keep = torch.rand(frames.shape, generator=generator) >= share
    return frames * keep.to(frames.device, frames.dtype) / (1.0 - share)


def ctc_stage(model: torch.nn.Module, examples: list[TrainItem], config: StageConfig, checkpoint: Path | None = None,
              evaluate: Callable[[], dict[str, float]] | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Train the projector's CTC head alone on transcription examples (``ctc_target`` set); returns the history."""
    examples = [example for example in examples if example.ctc_target is not None]
    projector = model.projector
    embeddings = model.llm.get_input_embeddings().weight

    def loss_fn(batch: list[TrainItem], step: int) -> dict[str, torch.Tensor]:
        frames, mask = _padded(model, batch)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        frames = time_masked(frames, mask, config.time_mask, generator)
        frames = feature_dropped(frames, config.feature_dropout, generator)
        frames, mask = model.pool_frames(frames, mask)
        logits = projector.logits(frames, embeddings, mask)  # (B, T', K+1)
        loss = ctc_loss(logits, mask.sum(dim=1), [example.ctc_target for example in batch], projector.blank)
        return {"loss": loss, "ctc": loss.detach()}

    groups = [{"params": [p for p in projector.parameters() if p.requires_grad], "lr": config.lr}]
    return _run_stage("ctc", model, examples, config, loss_fn, groups, checkpoint, evaluate, progress)


def joint_stage(model: torch.nn.Module, examples: list[TrainItem], config: StageConfig, checkpoint: Path | None = None,
                evaluate: Callable[[], dict[str, float]] | None = None, progress: bool = True,
                name: str = "joint") -> list[dict[str, float]]:
    """Train projector and LoRA matrices with the LM loss (+ ``ctc_weight`` x CTC on transcription rows).

    The projector's utterance summary (if any) is neither fed nor trained here: ``summary_stage`` does that.
    ``name`` labels the progress bar and the log (the balance stage runs through here too)."""
    projector = model.projector
    lora = [p for name, p in model.llm.named_parameters() if p.requires_grad and "lora_" in name]
    prosody = getattr(projector, "prosody", None)
    summary = getattr(projector, "summary", None)
    excluded = {id(p) for p in summary.parameters()} if summary is not None else set()
    separate = {id(p) for p in prosody.parameters()} if prosody is not None and config.prosody_lr else set()
    groups = [{"params": [p for p in projector.parameters() if p.requires_grad and id(p) not in separate | excluded],
               "lr": config.lr}]
    if separate:
        groups.append({"params": [p for p in prosody.parameters() if p.requires_grad], "lr": config.prosody_lr})
    if lora:
        groups.append({"params": lora, "lr": config.lora_lr or config.lr})
    return _run_stage(name, model, examples, config, _lm_loss(model, config, with_summary=False), groups,
                      checkpoint, evaluate, progress)


def summary_stage(model: torch.nn.Module, examples: list[TrainItem], config: StageConfig,
                  checkpoint: Path | None = None, evaluate: Callable[[], dict[str, float]] | None = None,
                  progress: bool = True) -> list[dict[str, float]]:
    """Train the projector's utterance summary (``lr``; + ``summary_weight`` x cross-entropy of its first vector's
    scores against the rows' ``summary_target``) with the LM loss, and the LLM's LoRA matrices at ``lora_lr`` (None:
    they stay as they are). The projector's per-frame path does not change; the summary goes only where a row's
    prompt asks for it (``<audio_summary>``), and transcription rows in ``examples`` keep the LoRA transcribing."""
    summary = getattr(model.projector, "summary", None)
    if summary is None:
        raise ValueError("summary_stage needs a projector with an utterance summary (summary_tokens >= 1)")
    groups = [{"params": list(summary.parameters()), "lr": config.lr}]
    if config.lora_lr:
        lora = [p for name, p in model.llm.named_parameters() if p.requires_grad and "lora_" in name]
        if lora:
            groups.append({"params": lora, "lr": config.lora_lr})
    return _run_stage("summary", model, examples, config, _lm_loss(model, config, with_summary=True), groups,
                      checkpoint, evaluate, progress)


def summary_word_stage(model: torch.nn.Module, examples: list[TrainItem], config: StageConfig,
                       checkpoint: Path | None = None, progress: bool = True) -> list[dict[str, float]]:
    """Teach the utterance summary alone, with no LLM in the loop, to name each row's ``summary_target`` (cross-
    entropy of its first vector's scores over the LLM's vocabulary): cheap, like the CTC stage for the words, and
    what makes the summary readable before the LM loss trains the LLM to read it."""
    summary = getattr(model.projector, "summary", None)
    if summary is None:
        raise ValueError("summary_word_stage needs a projector with an utterance summary (summary_tokens >= 1)")
    examples = [example for example in examples if example.summary_target is not None]

    def loss_fn(batch: list[TrainItem], step: int) -> dict[str, torch.Tensor]:
        frames, mask = _padded(model, batch)
        _, logits = model.summary_and_logits(frames, mask)  # (B, n, V)
        wanted = torch.tensor([example.summary_target for example in batch], device=logits.device)
        loss = nn.functional.cross_entropy(logits[:, 0].float(), wanted)
        return {"loss": loss, "summary": loss.detach()}

    groups = [{"params": list(summary.parameters()), "lr": config.lr}]
    return _run_stage("summary words", model, examples, config, loss_fn, groups, checkpoint, None, progress)


def _lm_loss(model: torch.nn.Module, config: StageConfig,
             with_summary: bool) -> Callable[[list[TrainItem], int], dict[str, torch.Tensor]]:
    """The LM loss of a batch (+ ``ctc_weight`` x CTC on its transcription rows), the utterance summary fed or not."""
    projector = model.projector

    def loss_fn(batch: list[TrainItem], step: int) -> dict[str, torch.Tensor]:
        frames, mask = _padded(model, batch)
        embeds, embeds_mask, logits = model.project(frames, mask)
        embeds, embeds_mask = model.adapter(embeds, embeds_mask)
        summary, summary_logits = model.summary_and_logits(frames, mask) if with_summary else (None, None)
        inputs = model.build_inputs([example.prompt for example in batch], embeds, embeds_mask,
                                    targets=[example.target for example in batch],
                                    assistant_prefix=[example.assistant_prefix or "" for example in batch],
                                    summary=summary)
        lm = model.loss(inputs, reduction=config.lm_reduction)
        rows = [row for row, example in enumerate(batch) if example.ctc_target is not None]
        result = {"lm": lm.detach()}
        total = lm
        if rows and config.ctc_weight > 0 and logits is not None:
            ctc = ctc_loss(logits[rows], embeds_mask[rows].sum(dim=1), [batch[row].ctc_target for row in rows],
                           projector.blank)
            total = lm + config.ctc_weight * ctc
            result["ctc"] = ctc.detach()
        named = [row for row, example in enumerate(batch) if example.summary_target is not None]
        if named and config.summary_weight > 0 and summary_logits is not None:
            wanted = torch.tensor([batch[row].summary_target for row in named], device=summary_logits.device)
            word = nn.functional.cross_entropy(summary_logits[named, 0].float(), wanted)
            total = total + config.summary_weight * word
            result["summary"] = word.detach()
        result["loss"] = total
        return result

    return loss_fn


__all__ = ["StageConfig", "ctc_stage", "ctc_speller", "ctc_text", "ctc_token_ids", "joint_stage", "summary_stage",
           "summary_word_stage"]
