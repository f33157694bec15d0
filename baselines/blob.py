"""BLoB: Bayesian low-rank adaptation by backpropagation (docs/methods.md), as the authors' code trains it.

Asymmetric Bayesianisation: per adapted layer only A is Gaussian, q(A_ij) = N(M_ij, (G_ij^2)^2)
(std parameterised as G^2, G init U(eps/sqrt 2, eps), eps = ``init_std_eps`` = 0.05); B is a point
estimate (zero init); prior p(A_ij) = N(0, ``prior_std``^2 = 0.2^2). The update

    y = W0 x + (alpha/r) B (M x + s_out * (E (s_in * x))),    E = G^2 * eps_E, eps_E ~ N(0, I)

uses Flipout: one draw E per forward and random signs s_in (d_in), s_out (r) per token (``flipout:
token``, the reference) or per example (``example``), so every example in a batch sees its own weight
noise from one forward pass. With ``lm_head`` among ``lora.target_modules`` the answer head gets the
same layer over its K answer rows (A: r x H Gaussian, B_K: K x r), as the reference's class-head LoRA:
z = W_K h + (alpha/r) B_K (M h + s_out * (E (s_in * h))). The layer update is added by a forward hook
(:class:`~baselines.hooked_adapter.HookedAdapter`), the head's in :meth:`BlobAdapter.head_update`;
pyro-ppl supplies the distributions and the KL is closed form,
KL = sum_ij KL(N(M_ij, G_ij^4) || N(0, prior_std^2)).

Training. Each minibatch g of the run (counted across epochs, gradient accumulation and processes) has a
KL weight pi_g, from ``kl_weighting``:
  constant:  pi_g = 1/M, M the minibatches per epoch;
  minibatch: pi_g = 2^i / (2^M - 1), i = g mod M (0..M-1): sums to 1 over each epoch;
  reference: the authors' cycle, pi_g = 2^i / (2^(C+1) - 1), i = (g mod C) + 1, over C =
             int(100 N^(pi/gamma) / batch_size) minibatches (``kl_gamma`` = 8).
``kl_optimizer: separate`` (the reference): AdamW steps on the mean CE alone (M, G and B), then after
every optimiser step a second optimiser, SGD at ``kl_lr`` (0.01) with the same warm-up schedule, steps
on (sum of the step's pi_g) * KL. ``joint``: one AdamW step on mean CE + pi_g KL / |b| per minibatch (the
ELBO per example). Prediction: S forward passes with fresh noise (seeded), or ``num_samples = 0``: the
mean weights (no noise), S = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bayeslora import FitReport, ResourceNeeds, distributed
from bayeslora.adapters import ClassifierHooks
from bayeslora.backbone import (
    HEAD_TARGET,
    Backbone,
    lora_parameter_count,
    target_modules,
)
from bayeslora.config import AdapterConfig, PositiveFloat, PositiveInt
from bayeslora.data import EncodedSplit
from bayeslora.predict import sample_class_logits
from bayeslora.training import final_train_loss, lr_schedule

from .hooked_adapter import HookedAdapter
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


HEAD_KEY = "answer_head"


class BlobAdapter(HookedAdapter):
    """M, G (the Gaussian over A) and B for every target module; Flipout noise inside :meth:`active`."""

    def __init__(self, modules: Mapping[str, nn.Module], r: int, alpha: float, seed: int = 0,
                 init_std_eps: float = 0.05, flipout: str = "token", head_ids: torch.Tensor | None = None,
                 hidden: int | None = None):
        super().__init__(modules, head_ids)
        self.flipout = flipout
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.M, self.G, self.B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        shapes = {key: (m.out_features, m.in_features, m.weight.device) for key, m in self.modules_by_key.items()}
        if head_ids is not None:  # the answer head's K rows (not a hooked module: see head_update)
            shapes[HEAD_KEY] = (len(head_ids), hidden, next(iter(modules.values())).weight.device)
        for key, (d_out, d_in, device) in shapes.items():
            bound = 1.0 / math.sqrt(d_in)  # peft's LoRA A init: kaiming_uniform(a=sqrt 5)
            self.M[key] = nn.Parameter((torch.rand(r, d_in, generator=generator) * 2 - 1).mul(bound).to(device))
            low = init_std_eps / math.sqrt(2)
            g = low + (init_std_eps - low) * torch.rand(r, d_in, generator=generator)
            self.G[key] = nn.Parameter(g.to(device))
            self.B[key] = nn.Parameter(torch.zeros(d_out, r, device=device))

    def std(self, key: str) -> torch.Tensor:
        return self.G[key] ** 2

    def head_update(self, features: torch.Tensor) -> torch.Tensor:
        """The answer head's BLoB layer on the last-position features h: (alpha/r) B_K (M h + Flipout noise)."""
        return self.update(HEAD_KEY, features)

    def kl(self, prior_std: float) -> torch.Tensor:
        return sum(gaussian_kl(self.M[k], self.std(k), prior_std) for k in self.M)

    def _randn(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def _signs(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=self.generator, device=like.device)
        return bits.to(like.dtype) * 2 - 1

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B (M x + s_out * (E (s_in * x))); signs drawn per token (every position of x) or per
        example (first axis)."""
        m = self.M[key]
        x = x.to(m.dtype)
        hidden = x @ m.T
        if self.stochastic:
            lead = tuple(x.shape[:-1]) if self.flipout == "token" else (x.shape[0],) + (1,) * (x.dim() - 2)
            s_in = self._signs(lead + (x.shape[-1],), x)
            s_out = self._signs(lead + (m.shape[0],), x)
            e = self.std(key) * self._randn(tuple(m.shape), m)
            hidden = hidden + s_out * ((s_in * x) @ e.T)
        return self.scale * hidden @ self.B[key].T


@dataclass
class BlobConfig(AdapterConfig):
    """BLoB's settings; the defaults are the authors' (their scripts' ``kl_lr``)."""

    prior_std: PositiveFloat = 0.2
    """Std of the Gaussian prior on A."""
    init_std_eps: PositiveFloat = 0.05
    """epsilon: G starts uniform in (epsilon/sqrt 2, epsilon)."""
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
    flipout: Literal["token", "example"] = "token"
    """Flipout signs drawn per token (the reference) or per example."""
    std_lr: PositiveFloat | None = None
    """Learning rate of G in the CE optimiser (None: train.lr, as the reference)."""
    samples_per_forward: PositiveInt = 1
    """Posterior samples stacked into one batched forward."""


class BlobHooks(ClassifierHooks):
    """Mean CE (+ pi_g KL / |b| when ``joint``) for AdamW over M, B (weight decay on B only) and G; with
    ``separate``, an SGD step on the step's KL weight times KL after every AdamW step."""

    def __init__(self, backbone: Backbone, adapter: BlobAdapter, config: BlobConfig, n_train: int,
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
        std_lr = self.config.std_lr or self.config.train.lr
        return [{"params": list(self.adapter.M.values()), "weight_decay": 0.0},
                {"params": list(self.adapter.B.values())},
                {"params": list(self.adapter.G.values()), "lr": std_lr, "weight_decay": 0.0}]

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
            params = [*self.adapter.M.values(), *self.adapter.G.values()]
            self.kl_optimizer = torch.optim.SGD(params, lr=self.config.kl_lr)
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


class Blob(HookedAdapterPosterior):
    """BLoB: Gaussian over LoRA A (Flipout), point-estimate B, closed-form KL; S forward passes."""

    name = "blob"
    adapts_lm_head = True  # the answer head's BLoB layer is its own (BlobAdapter.head_logits)
    supports_gradient_checkpointing = False
    Config = BlobConfig
    description = "BLoB: Gaussian LoRA A (std G^2, Flipout) + point B, closed-form KL, S forward passes"
    saves_state = True

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """M and B (a LoRA adapter's worth, the answer head's K rows included) plus G, one per entry of A."""
        g = sum(config.lora.r * m.in_features for m in target_modules(backbone, config.lora).values())
        head = config.lora.r * backbone.hidden_size if HEAD_TARGET in config.lora.target_modules else 0
        return ResourceNeeds(trainable=lora_parameter_count(backbone, config.lora, num_classes) + g + head)

    def build_adapter(self, backbone: Backbone) -> BlobAdapter:
        lora = self.config.lora
        head_ids = self.answer_ids if HEAD_TARGET in lora.target_modules else None
        return BlobAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed,
                           init_std_eps=self.config.init_std_eps, flipout=self.config.flipout, head_ids=head_ids,
                           hidden=backbone.hidden_size)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.adapter.answer_logits(self.require_backbone(), batch)

    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> BlobHooks:
        return BlobHooks(backbone, self.adapter, self.config, n_train, batches_per_epoch)

    def sample(self, batch: dict[str, Any], num_samples: int) -> torch.Tensor:
        """Flipout draws noise per example, so ``samples_per_forward`` samples share one batched forward."""
        return sample_class_logits(self.require_backbone(), batch, num_samples,
                                   samples_per_forward=self.config.samples_per_forward, logits=self.logits)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        n_a = sum(p.numel() for p in self.adapter.M.values())
        return FitReport(trainable_params=sum(p.numel() for p in self.adapter.parameters()),
                         posterior_params=2 * n_a, train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "kl": self.adapter.kl(self.config.prior_std).item(),
                                "final_train_loss": final_train_loss(result)})
