"""The one fine-tuning loop. Methods extend it through :class:`TrainingHooks`, never by copying it.

AdamW (or the optimiser ``hooks.make_optimizer`` builds) over ``hooks.param_groups()``, linear (or
constant / cosine) schedule with warm-up,
gradient accumulation, data parallelism across processes (:mod:`bayeslora.distributed`),
gradient-norm clipping, bf16 autocast on GPU, early stopping on
validation NLL (the best epoch's trainable state restored, or the last one with ``keep: last``),
attention kernels that are safe to differentiate (:mod:`bayeslora.attention`), a progress bar, and a clear
error on NaN loss.
Extension points: extra loss terms (override ``loss``), parameter groups, the optimiser, a gradient transform
before each optimiser step (e.g. a landing field), and per-step callbacks (e.g. SWAG snapshots).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .attention import differentiable_attention
from .config import TrainSettings, check_choice
from .data import EncodedSplit, fit_loaders
from .errors import ConfigError, TrainingError
from .profiling import peak_memory_mb, phase, reset_peak_memory


class TrainingHooks:
    """What a method plugs into the loop. Subclasses must implement :meth:`loss`."""

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups (dicts with 'params' and optional 'lr'/'weight_decay'; 'clip': False
        leaves a group out of the gradient-norm clipping)."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """The minibatch objective to minimise (CE plus any extra terms)."""
        raise NotImplementedError

    def make_optimizer(self, groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.Optimizer:
        """The optimiser over ``groups``: AdamW at ``settings.lr`` with ``settings.weight_decay``. The loop's
        schedule scales each group's ``lr``."""
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)

    def step_context(self) -> AbstractContextManager[Any]:
        """Entered around each minibatch's forward *and* backward: gradient checkpointing recomputes
        the forward inside backward, so a mode the forward depends on (train-mode dropout) must hold
        through both."""
        return contextlib.nullcontext()

    def val_nll(self, loader: DataLoader) -> float:
        """Validation NLL for early stopping; return NaN to disable."""
        return float("nan")

    def transform_gradients(self) -> None:
        """Called after backward (and unscaling), before clipping and the optimiser step."""

    def on_step_end(self, step: int, epoch: float) -> None:
        """Called after each optimiser step (e.g. to collect SWAG snapshots)."""

    def on_train_begin(self, total_steps: int) -> None:
        """Called once before the first step."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Trainable state to keep for the best validation epoch (early stopping)."""
        return {}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`snapshot` returned."""


@dataclass
class TrainResult:
    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    best_val_nll: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)
    tokens: int = 0
    """Prompt tokens (attention-mask ones, padding excluded) in the minibatches this process trained on."""
    peak_mem_mb: float = 0.0
    """Peak accelerator memory allocated while training (the process's peak RSS on CPU)."""


def train_seeded(make_hooks: Callable[[DataLoader], TrainingHooks], train_split: EncodedSplit,
                 val_split: EncodedSplit | None, settings: TrainSettings, seed: int, device: torch.device,
                 desc: str = "train") -> TrainResult:
    """The shared loop with everything random fixed by ``seed``: ``torch.manual_seed(seed)``, the seeded
    shuffling and validation loaders (:func:`bayeslora.data.fit_loaders`), then ``make_hooks(loader)``
    (built after seeding, so the hooks' own random draws follow from ``seed`` too) trained by :func:`train`."""
    torch.manual_seed(seed)
    loader, val_loader = fit_loaders(train_split, val_split, settings.batch_size, settings.eval_batch_size, seed)
    return train(make_hooks(loader), loader, settings, device, val_loader, desc=desc)


def final_train_loss(result: TrainResult) -> float:
    """The smoothed training loss at the last validation point (NaN without validation)."""
    return result.history[-1]["train_loss"] if result.history else float("nan")


def lr_schedule(settings: TrainSettings, total: int) -> Callable[[int], float]:
    """step -> the learning-rate factor: linear warm-up over ``warmup_ratio`` of ``total`` steps, then linear,
    cosine or constant (``settings.schedule``)."""
    warmup = int(settings.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if settings.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if settings.schedule == "constant":
            return 1.0
        raise ConfigError(f"train.schedule must be linear, cosine or constant, got {settings.schedule!r}")

    factor(0)
    return factor


def _batches(loader: DataLoader) -> Iterator[tuple[float, dict[str, Any]]]:
    epoch = 0
    while True:
        for i, batch in enumerate(loader):
            yield epoch + (i + 1) / len(loader), batch
        epoch += 1


def autocast_context(settings: TrainSettings, device: torch.device) -> Any:
    enabled = settings.autocast == "bf16" or (settings.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def train(hooks: TrainingHooks, loader: DataLoader, settings: TrainSettings, device: torch.device,
          val_loader: DataLoader | None = None, desc: str = "train") -> TrainResult:
    """Run the loop for ``settings.max_steps`` optimiser steps, or else ``settings.epochs`` epochs (fractional
    allowed) of ``loader``."""
    with phase("train"):
        return _train(hooks, loader, settings, device, val_loader, desc)


def _train(hooks: TrainingHooks, loader: DataLoader, settings: TrainSettings, device: torch.device,
           val_loader: DataLoader | None, desc: str) -> TrainResult:
    if settings.epochs <= 0 or settings.batch_size <= 0 or settings.grad_accum <= 0:
        raise ConfigError("train.epochs, train.batch_size and train.grad_accum must be positive")
    check_choice("train.keep", settings.keep, ("best_val", "last"))
    groups = hooks.param_groups()
    params = [p for g in groups for p in g["params"]]
    clipped = [p for g in groups if g.get("clip", True) for p in g["params"]]
    if not params:
        raise ConfigError(f"{desc}: no trainable parameters were given to the training loop")
    optimizer = hooks.make_optimizer(groups, settings)
    world = distributed.world_size()  # data parallel: one step = grad_accum x world minibatches
    total = settings.max_steps or max(1, math.ceil(settings.epochs * len(loader) / (settings.grad_accum * world)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings, total))
    hooks.on_train_begin(total)
    result = TrainResult()
    reset_peak_memory(device)
    start = time.perf_counter()
    best_state, best_nll, bad_epochs, next_eval = None, float("inf"), 0, 1.0
    bar = tqdm(total=total, desc=desc, disable=not settings.progress, leave=False, dynamic_ncols=True)
    batches = distributed.shard_batches(_batches(loader))
    step, running = 0, 0.0
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(settings.grad_accum):
            epoch, batch = next(batches)
            with hooks.step_context(), differentiable_attention():
                with autocast_context(settings, device):
                    loss = hooks.loss(batch, step)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{desc}: loss became {loss.item()} at step {step} (epoch {epoch:.2f}). "
                        f"Fix: lower train.lr (now {settings.lr}), keep train.max_grad_norm set, or check the data."
                    )
                (loss / settings.grad_accum).backward()
            if "attention_mask" in batch:
                result.tokens += int(batch["attention_mask"].sum())
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        distributed.average_gradients(params)
        hooks.transform_gradients()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(clipped, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        hooks.on_step_end(step, epoch)
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if val_loader is not None and (epoch >= next_eval or step == total):
            next_eval = math.floor(epoch) + 1.0
            nll = hooks.val_nll(val_loader)
            result.history.append({"step": step, "epoch": epoch, "train_loss": running, "val_nll": nll})
            if math.isfinite(nll):
                if nll < best_nll - 1e-6:
                    best_nll, bad_epochs = nll, 0
                    best_state = hooks.snapshot() if settings.keep == "best_val" else None
                else:
                    bad_epochs += 1
                    patience = settings.early_stopping_patience
                    if patience is not None and bad_epochs > patience:
                        break
    bar.close()
    if best_state:
        hooks.restore(best_state)
    result.steps, result.epochs = step, epoch
    result.seconds = time.perf_counter() - start
    result.peak_mem_mb = peak_memory_mb(device)
    result.best_val_nll = best_nll if math.isfinite(best_nll) else float("nan")
    return result
