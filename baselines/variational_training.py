"""The variational-LoRA training the BLoB and ScalaBL codes share: cross-entropy steps on the noisy adapter,
the KL term weighted per minibatch and, by default, stepped by its own optimiser (docs/methods.md).

Each minibatch g of the run (counted across epochs, gradient accumulation and processes) has a KL weight
pi_g, from ``kl_weighting``:
  constant:  pi_g = 1/M, M the minibatches per epoch;
  minibatch: pi_g = 2^i / (2^M - 1), i = g mod M (0..M-1): sums to 1 over each epoch;
  reference: the authors' cycle, pi_g = 2^i / (2^(C+1) - 1), i = (g mod C) + 1, over C =
             int(100 N^(pi/gamma) / batch_size) minibatches (``kl_gamma`` = 8).
``kl_optimizer: separate`` (the reference codes): AdamW steps on the mean CE alone, then after every
optimiser step a second optimiser, SGD at ``kl_lr`` with the same warm-up schedule, steps on
(sum of the step's pi_g) * KL over the adapter's variational parameters. ``joint``: one AdamW step on
mean CE + pi_g KL / |b| per minibatch (the ELBO per example).

An adapter trained here (:class:`~baselines.hooked_adapter.HookedAdapter`) provides ``kl(prior_std)``,
``optimizer_groups(config)`` (the AdamW groups), ``kl_parameters()`` (what the KL optimiser steps) and
``mean_weights()`` (validation runs at the mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bayeslora import distributed
from bayeslora.adapters import ClassifierHooks
from bayeslora.backbone import HEAD_TARGET, Backbone
from bayeslora.config import AdapterConfig, PositiveFloat, PositiveInt
from bayeslora.predict import sample_class_logits
from bayeslora.training import lr_schedule

from .hooked_posterior import HookedAdapterPosterior


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """sum KL(N(mean, std^2) || N(0, prior_std^2)), closed form (pyro/torch Normal-Normal KL)."""
    q = dist.Normal(mean, std)
    p = dist.Normal(torch.zeros_like(mean), torch.full_like(mean, prior_std))
    return torch.distributions.kl_divergence(q, p).sum()


def minibatch_kl_weight(index: int, num_batches: int) -> float:
    """pi_i = 2^i / (2^M - 1), i = 0..M-1: the KL weight of the i-th minibatch of an epoch (computed as
    2^(i-M) / (1 - 2^-M), which does not overflow for M > 1023)."""
    return math.ldexp(1.0, index - num_batches) / (1.0 - math.ldexp(1.0, -num_batches))


def reference_kl_cycle(n_train: int, batch_size: int, gamma: float) -> int:
    """C = int(100 N^(pi/gamma) / batch_size): the length in minibatches of the reference's KL cycle."""
    return max(1, int(100 * n_train ** (math.pi / gamma) / batch_size))


def reference_kl_weight(index: int, cycle: int) -> float:
    """pi = 2^i / (2^(C+1) - 1) with i = (index mod C) + 1: the reference's weight of minibatch ``index``."""
    i = index % cycle + 1
    return math.ldexp(1.0, i - cycle - 1) / (1.0 - math.ldexp(1.0, -cycle - 1))


@dataclass
class VariationalTrainingConfig(AdapterConfig):
    """The KL schedule and optimiser shared by the variational adapters (BLoB, ScalaBL)."""

    prior_std: PositiveFloat = 0.2
    """Std of the zero-mean Gaussian prior on the variational parameters."""
    kl_weighting: Literal["constant", "minibatch", "reference"] = "reference"
    """KL weight per minibatch: constant (1/M), minibatch (2^i/(2^M-1) over an epoch) or reference (the
    authors' cycle of int(100 N^(pi/kl_gamma)/batch_size) minibatches)."""
    kl_gamma: PositiveFloat = 8.0
    """gamma of the reference cycle's length."""
    kl_optimizer: Literal["separate", "joint"] = "separate"
    """separate: the KL term stepped by its own SGD after each CE step (the reference); joint: CE + KL
    in one AdamW loss."""
    kl_lr: PositiveFloat = 0.01
    """Learning rate of the separate KL optimiser (SGD, the training schedule)."""
    samples_per_forward: PositiveInt = 1
    """Posterior samples stacked into one batched forward (adapters that draw noise per example)."""


class VariationalHooks(ClassifierHooks):
    """Mean CE (+ pi_g KL / |b| when ``joint``) for AdamW over the adapter's ``optimizer_groups``; with
    ``separate``, an SGD step on the step's KL weight times KL after every AdamW step."""

    def __init__(self, backbone: Backbone, adapter: Any, config: VariationalTrainingConfig, n_train: int,
                 batches_per_epoch: int):
        super().__init__(backbone, dict(adapter.named_parameters()))
        self.adapter, self.config = adapter, config
        self.n_train, self.batches_per_epoch = n_train, batches_per_epoch
        self.cycle = reference_kl_cycle(n_train, config.train.batch_size, config.kl_gamma)
        self.last_kl = float("nan")
        self.kl_optimizer: torch.optim.Optimizer | None = None
        self.kl_scheduler: Any = None
        self._step, self._micro = -1, 0

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.adapter.answer_logits(self.backbone, batch)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.adapter.optimizer_groups(self.config)

    def minibatch_weight(self, index: int) -> float:
        """pi_g of the run's ``index``-th minibatch (see the module docstring)."""
        if self.config.kl_weighting == "constant":
            return 1.0 / self.batches_per_epoch
        if self.config.kl_weighting == "minibatch":
            return minibatch_kl_weight(index % self.batches_per_epoch, self.batches_per_epoch)
        return reference_kl_weight(index, self.cycle)

    def minibatches_of_step(self, step: int) -> range:
        """The run's minibatch indices that optimiser step ``step`` (0-based) consumes: grad_accum x world
        consecutive ones (process p takes every world-th, see :func:`bayeslora.distributed.shard_batches`)."""
        per_step = self.config.train.grad_accum * distributed.world_size()
        return range(step * per_step, (step + 1) * per_step)

    def step_kl_weight(self, step: int) -> float:
        return sum(self.minibatch_weight(g) for g in self.minibatches_of_step(step))

    def on_train_begin(self, total_steps: int) -> None:
        if self.config.kl_optimizer == "separate":
            self.kl_optimizer = torch.optim.SGD(list(self.adapter.kl_parameters()), lr=self.config.kl_lr)
            self.kl_scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.kl_optimizer, lr_schedule(self.config.train, total_steps))

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        logits = self.logits(batch)
        nll = F.cross_entropy(logits, batch["labels"].to(logits.device))
        if self.config.kl_optimizer == "separate":
            return nll
        if step != self._step:
            self._step, self._micro = step, 0
        index = (step * self.config.train.grad_accum + self._micro) * distributed.world_size() + distributed.rank()
        self._micro += 1
        kl = self.adapter.kl(self.config.prior_std)
        self.last_kl = float(kl.detach())
        return nll + self.minibatch_weight(index) / len(batch["labels"]) * kl

    def on_step_end(self, step: int, epoch: float) -> None:
        """The reference's second step: SGD on pi_step * KL (identical on every process: KL depends on the
        parameters only, and pi_step on the step)."""
        if self.kl_optimizer is None:
            return
        self.kl_optimizer.zero_grad(set_to_none=True)
        kl = self.adapter.kl(self.config.prior_std)
        self.last_kl = float(kl.detach())
        (self.step_kl_weight(step - 1) * kl).backward()
        self.kl_optimizer.step()
        self.kl_scheduler.step()
        self.kl_optimizer.zero_grad(set_to_none=True)

    def val_nll(self, loader: DataLoader) -> float:
        with self.adapter.mean_weights():
            return super().val_nll(loader)


class VariationalAdapterPosterior(HookedAdapterPosterior):
    """A hooked variational adapter (with an answer-head part when ``lm_head`` is a target) trained by
    :class:`VariationalHooks`; S forward passes, ``samples_per_forward`` of them stacked in one batch."""

    adapts_lm_head = True  # the adapter's answer-head part is its own (HookedAdapter.head_update)
    supports_gradient_checkpointing = False
    saves_state = True

    def head_ids(self) -> torch.Tensor | None:
        """The training set's answer tokens when ``lm_head`` is among the targets (the head part's rows)."""
        return self.answer_ids if HEAD_TARGET in self.config.lora.target_modules else None

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.adapter.answer_logits(self.require_backbone(), batch)

    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> VariationalHooks:
        return VariationalHooks(backbone, self.adapter, self.config, n_train, batches_per_epoch)

    def sample(self, batch: dict[str, Any], num_samples: int) -> torch.Tensor:
        """Adapters that draw noise per example give each stacked copy its own sample."""
        return sample_class_logits(self.require_backbone(), batch, num_samples,
                                   samples_per_forward=self.config.samples_per_forward, logits=self.logits)
