"""Training of the projector + length adapter on cached encoder frames, with a frozen LLM.

Defaults follow Annex A of Bellver-Soler et al. (2025): batch 4, gradient accumulation 2, 20 epochs, AdamW with
betas (0.9, 0.98), eps 1e-5, weight decay 0. The paper prints the learning rate as "10e-4"; we read it as 1e-4
(``10e-4`` literally is 1e-3, which diverges more easily) and let ``--lr`` change it.

A checkpoint is written after every epoch (atomically); a run started again with the same folder resumes after the
last finished epoch. A non-finite loss stops the run with ``TrainingDiverged`` and leaves the last good checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from speechtrim.assets.cache import atomic_file
from speechtrim.hf.prefix import PrefixCache
from speechtrim.train.encoder_cache import pad_frames

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


LR_SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig:
    """Optimisation settings (Annex A defaults).

    Args:
        epochs: passes over the training set.
        batch_size: examples per forward pass.
        grad_accum: forward passes per optimiser step.
        lr: AdamW learning rate.
        adapter_lr: learning rate of the length adapter's own weights (None: ``lr``). A short run needs a high
            projector rate, and its outputs then grow far beyond the LLM's token embeddings (row norm ~130 against
            ~3 after the quick preset), which saturates the attention adapters' softmax (one frame gets 0.9-0.98
            of the weight at an adapter rate of 1e-4); the CPU preset therefore keeps the adapters near their
            pooling start with 1e-5.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (None: off).
        lr_schedule: "constant" (Annex A names none) or "linear" (decays from ``lr`` towards 0 over the run, as
            Hugging Face's Trainer does by default; steadier ends for short runs at a high learning rate).
        group_by_length: batch clips of similar length together (sorted within windows of 16 batches, the
            batches then shuffled): less padding, so fewer wasted tokens per step. Beware when length carries the
            label (emotions change the speaking rate): batches then hold mostly one class, which hurt the quick
            compare-adapters preset (BENCHMARKS.md).
        seed: seeds Python, NumPy and torch, and the shuffling.
    """

    epochs: int = 20
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 1e-4
    adapter_lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "constant"
    group_by_length: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or (self.adapter_lr is not None and not self.adapter_lr > 0):
            raise ValueError(f"lr and adapter_lr must be > 0, got {self.lr} and {self.adapter_lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


@dataclass
class TrainItem:
    """One training example: cached encoder frames (T, D_enc), the user prompt with ``<audio>``, the answer,
    optionally its own assistant prefix (None: the trainer's), so one run can mix tasks, and for transcription rows
    of the embedded model's CTC training the transcript as indices into the projector's vocabulary, and for its
    emotion rows the label's first token id, which the utterance summary learns to name."""

    frames: torch.Tensor
    prompt: str
    target: str
    assistant_prefix: str | None = None
    ctc_target: torch.Tensor | None = None
    summary_target: int | None = None  # an LLM token id the utterance summary should name (the emotion label's)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector and adapter weights (everything that trains), detached copies."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()
            if name.startswith(("projector.", "adapter."))}


def fit(
    model: torch.nn.Module,
    items: list[TrainItem],
    config: TrainConfig,
    checkpoint: Path | None = None,
    assistant_prefix: str = "",
    progress: bool = True,
    prefix_cache: PrefixCache | None = None,
) -> list[dict[str, float]]:
    """Train ``model.projector`` and ``model.adapter`` on ``items``; returns the per-epoch history.

    Args:
        model: a SpeechLM.
        items: training examples.
        config: optimisation settings.
        checkpoint: file for the per-epoch checkpoint; an existing one is resumed.
        assistant_prefix: text the assistant turn starts with before the target (the paper's
            "The emotion of the audio is:").
        progress: show a progress bar.
        prefix_cache: keys and values of the frozen LLM for the prompt text in front of the audio, computed once
            per distinct text instead of at every step (same loss and gradients); a fresh one when None.
    """
    if not items:
        raise ValueError("fit() needs at least one training example")
    seed_everything(config.seed)
    parameters = [p for name, p in model.named_parameters() if p.requires_grad]
    optimizer = _optimizer(model, config)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resumed state overwrites them
    history, start_epoch = _resume(model, optimizer, config, checkpoint)
    order_rng = np.random.default_rng(config.seed)
    lengths = [item.frames.shape[0] + len(item.prompt) + len(item.target) for item in items]
    # every epoch's batches are drawn up front, so a resumed run sees the same ones
    epochs = [_batches(order_rng.permutation(len(items)), lengths, config, order_rng) for _ in range(config.epochs)]
    steps_per_epoch = len(epochs[0])
    updates_per_epoch = math.ceil(steps_per_epoch / config.grad_accum)
    total_updates = updates_per_epoch * config.epochs
    prefix_cache = PrefixCache(model.llm) if prefix_cache is None else prefix_cache
    model.train()
    for epoch in range(start_epoch, config.epochs):
        total, batches = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for step in bar:
            chosen = [items[i] for i in epochs[epoch][step]]
            loss = _batch_loss(model, chosen, assistant_prefix, prefix_cache)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; the last good checkpoint "
                    f"({checkpoint or 'none'}) is kept. Lower the learning rate (now {config.lr}) and run again."
                )
            (loss / config.grad_accum).backward()
            if (step + 1) % config.grad_accum == 0 or step + 1 == steps_per_epoch:
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                update = epoch * updates_per_epoch + step // config.grad_accum
                factor = 1.0 - update / total_updates if config.lr_schedule == "linear" else 1.0
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item()
            batches += 1
            bar.set_postfix(loss=f"{total / batches:.4f}")
        history.append({"epoch": epoch + 1, "loss": total / batches})
        logger.info("epoch %d: loss %.4f", epoch + 1, total / batches)
        if checkpoint is not None:
            with atomic_file(checkpoint, mode="wb") as handle:
                torch.save({"model": trainable_state(model), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                            "history": history, "config": asdict(config)}, handle)
    model.eval()
    return history


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, the adapter's at its own learning rate when the config sets one."""
    adapter = [p for name, p in model.named_parameters() if p.requires_grad and name.startswith("adapter.")]
    others = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("adapter.")]
    groups = [{"params": others}, {"params": adapter, "lr": config.lr if config.adapter_lr is None else config.adapter_lr}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=config.lr, betas=config.betas,
                             eps=config.eps, weight_decay=config.weight_decay)


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
            checkpoint: Path | None) -> tuple[list[dict[str, float]], int]:
    """The history and first epoch of a run: from ``checkpoint`` when it exists (same settings only), else fresh."""
    if checkpoint is None or not checkpoint.is_file():
        return [], 0
    state = torch.load(checkpoint, weights_only=False)
    before, now = dict(state["config"]), asdict(config)
    if config.lr_schedule == "constant":
        before.pop("epochs"), now.pop("epochs")  # training longer is a valid resume (a decay would change)
    if before != now:
        raise ValueError(f"checkpoint {checkpoint} was made with other settings {state['config']}; "
                         "use another folder or the same settings (only epochs may change, and only with a "
                         "constant learning rate)")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    logger.info("resuming %s after epoch %d", checkpoint, state["epoch"])
    return state["history"], state["epoch"]


def _batch_loss(model: torch.nn.Module, chosen: list[TrainItem], assistant_prefix: str,
                prefix_cache: PrefixCache) -> torch.Tensor:
    """The LM loss of one batch of training items."""
    frames, mask = pad_frames([item.frames for item in chosen])
    embeds, embeds_mask = model.embed_audio(frames.to(model.device), mask.to(model.device))
    batch = model.build_inputs([item.prompt for item in chosen], embeds, embeds_mask,
                               targets=[item.target for item in chosen],
                               assistant_prefix=[assistant_prefix if item.assistant_prefix is None
                                                 else item.assistant_prefix for item in chosen],
                               prefix_cache=prefix_cache)
    return model.loss(batch)


def _batches(order: np.ndarray, lengths: list[int], config: TrainConfig, rng: np.random.Generator) -> list[list[int]]:
    """One epoch's batches of item indices: in ``order``, or grouped by length when the config asks."""
    size = config.batch_size
    if not config.group_by_length:
        return [order[start : start + size].tolist() for start in range(0, len(order), size)]
    window = size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    return [batches[i] for i in rng.permutation(len(batches))]
