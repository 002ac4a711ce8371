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
from speechtrim.train.encoder_cache import pad_frames

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Optimisation settings (Annex A defaults).

    Args:
        epochs: passes over the training set.
        batch_size: examples per forward pass.
        grad_accum: forward passes per optimiser step.
        lr: AdamW learning rate.
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (None: off).
        seed: seeds Python, NumPy and torch, and the shuffling.
    """

    epochs: int = 20
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainItem:
    """One training example: cached encoder frames (T, D_enc), the user prompt with ``<audio>``, the answer."""

    frames: torch.Tensor
    prompt: str
    target: str


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
    """
    if not items:
        raise ValueError("fit() needs at least one training example")
    seed_everything(config.seed)
    parameters = [p for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        before, now = dict(state["config"]), asdict(config)
        before.pop("epochs"), now.pop("epochs")  # training longer is a valid resume
        if before != now:
            raise ValueError(f"checkpoint {checkpoint} was made with other settings {state['config']}; "
                             "use another folder or the same settings (only epochs may change)")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
        logger.info("resuming %s after epoch %d", checkpoint, start_epoch)
    order_rng = np.random.default_rng(config.seed)
    orders = [order_rng.permutation(len(items)) for _ in range(config.epochs)]  # same order whether resumed or not
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    model.train()
    for epoch in range(start_epoch, config.epochs):
        total, batches = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for step in bar:
            chosen = [items[i] for i in orders[epoch][step * config.batch_size : (step + 1) * config.batch_size]]
            frames, mask = pad_frames([item.frames for item in chosen])
            embeds, embeds_mask = model.embed_audio(frames.to(model.device), mask.to(model.device))
            batch = model.build_inputs([item.prompt for item in chosen], embeds, embeds_mask,
                                       targets=[item.target for item in chosen], assistant_prefix=assistant_prefix)
            loss = model.loss(batch)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; the last good checkpoint "
                    f"({checkpoint or 'none'}) is kept. Lower the learning rate (now {config.lr}) and run again."
                )
            (loss / config.grad_accum).backward()
            if (step + 1) % config.grad_accum == 0 or step + 1 == steps_per_epoch:
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
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
