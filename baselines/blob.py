"""BLoB: Bayesian low-rank adaptation by backpropagation (docs/methods.md) [code].

Asymmetric Bayesianisation: per adapted layer only A is Gaussian, q(A_ij) = N(M_ij, (G_ij^2)^2)
(std parameterised as G^2, G init U(eps/sqrt 2, eps), eps = ``init_std_eps`` = 0.05); B is a point
estimate (zero init); prior p(A_ij) = N(0, ``prior_std``^2 = 0.2^2). The update

    y = W0 x + (alpha/r) B (M x + s_out * (E (s_in * x))),    E = G^2 * eps_E, eps_E ~ N(0, I)

uses Flipout: one draw E per forward and random signs s_in (d_in), s_out (r) per example, so every
example in a batch sees (pseudo-)independent weight noise from one forward pass. It is added by a
forward hook (:class:`~baselines.hooked_adapter.HookedAdapter`); pyro-ppl supplies the
distributions and the KL is closed form, KL = sum_ij KL(N(M_ij, G_ij^4) || N(0, prior_std^2)),
computed with torch's registered Normal-Normal KL on ``pyro.distributions.Normal``. A hand-written
custom layer is needed because Flipout's per-example signs are not a weight sample that a pyro
``sample`` site plus ``functional_call`` could express.

Objective per minibatch b of size |b| (the shared training loop): mean_b CE + w_b KL, with
``kl_weighting`` ``constant``: w_b = 1/N, or ``minibatch``: w_b = pi_i / |b|, pi_i = 2^i / (2^M - 1)
for the i-th (i = 0..M-1) of M minibatches of an epoch (sums to 1 over the epoch; an earlier spec wrote the
same with M + 1 batches). G trains at its own learning rate ``std_lr`` and no weight decay (BLoB's
separate optimiser for the variance, as an AdamW parameter group). Prediction: S forward passes with
fresh noise (seeded), or ``num_samples = 0``: the mean weights (no noise), S = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bayeslora import ConfigError, FitReport, ResourceNeeds
from bayeslora.adapters import ClassifierHooks
from bayeslora.backbone import Backbone, lora_parameter_count, target_modules
from bayeslora.config import AdapterConfig, check_choice
from bayeslora.data import EncodedSplit
from bayeslora.predict import sample_class_logits
from bayeslora.training import final_train_loss

from .hooked_adapter import HookedAdapter
from .hooked_posterior import HookedAdapterPosterior

KL_WEIGHTINGS = ("constant", "minibatch")


def gaussian_kl(mean: torch.Tensor, std: torch.Tensor, prior_std: float) -> torch.Tensor:
    """sum KL(N(mean, std^2) || N(0, prior_std^2)), closed form (pyro/torch Normal-Normal KL)."""
    q = dist.Normal(mean, std)
    p = dist.Normal(torch.zeros_like(mean), torch.full_like(mean, prior_std))
    return torch.distributions.kl_divergence(q, p).sum()


def minibatch_kl_weight(index: int, num_batches: int) -> float:
    """pi_i = 2^i / (2^M - 1), i = 0..M-1: the KL weight of the i-th minibatch of an epoch."""
    return math.ldexp(1.0, index) / (math.ldexp(1.0, num_batches) - 1.0)


class BlobAdapter(HookedAdapter):
    """M, G (the Gaussian over A) and B for every target module; Flipout noise inside :meth:`active`."""

    def __init__(self, modules: Mapping[str, nn.Module], r: int, alpha: float, seed: int = 0,
                 init_std_eps: float = 0.05):
        super().__init__(modules)
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.M, self.G, self.B = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for key, module in self.modules_by_key.items():
            d_out, d_in, device = module.out_features, module.in_features, module.weight.device
            bound = 1.0 / math.sqrt(d_in)  # peft's LoRA A init: kaiming_uniform(a=sqrt 5)
            self.M[key] = nn.Parameter((torch.rand(r, d_in, generator=generator) * 2 - 1).mul(bound).to(device))
            low = init_std_eps / math.sqrt(2)
            g = low + (init_std_eps - low) * torch.rand(r, d_in, generator=generator)
            self.G[key] = nn.Parameter(g.to(device))
            self.B[key] = nn.Parameter(torch.zeros(d_out, r, device=device))

    def std(self, key: str) -> torch.Tensor:
        return self.G[key] ** 2

    def kl(self, prior_std: float) -> torch.Tensor:
        return sum(gaussian_kl(self.M[k], self.std(k), prior_std) for k in self.M)

    def _randn(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def _signs(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, shape, generator=self.generator, device=like.device)
        return bits.to(like.dtype) * 2 - 1

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B (M x + s_out * (E (s_in * x))); signs drawn per example (first axis)."""
        m = self.M[key]
        x = x.to(m.dtype)
        hidden = x @ m.T
        if self.stochastic:
            per_example = (x.shape[0],) + (1,) * (x.dim() - 2)
            s_in = self._signs(per_example + (x.shape[-1],), x)
            s_out = self._signs(per_example + (m.shape[0],), x)
            e = self.std(key) * self._randn(tuple(m.shape), m)
            hidden = hidden + s_out * ((s_in * x) @ e.T)
        return self.scale * hidden @ self.B[key].T


@dataclass
class BlobConfig(AdapterConfig):
    """``prior_std``: std of the prior on A; ``init_std_eps``: G ~ U(eps/sqrt 2, eps); ``kl_weighting``:
    constant (1/N) or minibatch (pi_i); ``std_lr``: learning rate of G (None: ``train.lr``);
    ``samples_per_forward``: posterior samples stacked into one batched forward at prediction."""

    prior_std: float = 0.2
    """Std of the Gaussian prior on A."""
    init_std_eps: float = 0.05
    """epsilon: G starts uniform in (epsilon/sqrt 2, epsilon)."""
    kl_weighting: str = "constant"
    """KL weight per minibatch: constant (1/N) or minibatch (pi_i)."""
    std_lr: float | None = None
    """Learning rate of G (None: train.lr)."""
    samples_per_forward: int = 1
    """Posterior samples stacked into one batched forward."""

    def check(self) -> None:
        check_choice("blob kl_weighting", self.kl_weighting, KL_WEIGHTINGS)
        if self.prior_std <= 0 or self.init_std_eps <= 0 or self.samples_per_forward < 1:
            raise ConfigError("blob prior_std and init_std_eps must be positive and samples_per_forward >= 1")


class BlobHooks(ClassifierHooks):
    """mean CE + w_b KL; M and B at train.lr (weight decay on B only), G at std_lr."""

    def __init__(self, backbone: Backbone, adapter: BlobAdapter, config: BlobConfig, n_train: int,
                 batches_per_epoch: int):
        super().__init__(backbone, dict(adapter.named_parameters()))
        self.adapter, self.config = adapter, config
        self.n_train, self.batches_per_epoch = n_train, batches_per_epoch
        self.last_kl = float("nan")

    def param_groups(self) -> list[dict[str, Any]]:
        std_lr = self.config.std_lr or self.config.train.lr
        return [{"params": list(self.adapter.M.values()), "weight_decay": 0.0},
                {"params": list(self.adapter.B.values())},
                {"params": list(self.adapter.G.values()), "lr": std_lr, "weight_decay": 0.0}]

    def kl_weight(self, step: int, batch_size: int) -> float:
        if self.config.kl_weighting == "constant":
            return 1.0 / self.n_train
        index = (step * self.config.train.grad_accum) % self.batches_per_epoch
        return minibatch_kl_weight(index, self.batches_per_epoch) / batch_size

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        logits = self.logits(batch)
        kl = self.adapter.kl(self.config.prior_std)
        self.last_kl = float(kl.detach())
        nll = F.cross_entropy(logits, batch["labels"].to(logits.device))
        return nll + self.kl_weight(step, len(batch["labels"])) * kl

    def val_nll(self, loader: DataLoader) -> float:
        with self.adapter.mean_weights():
            return super().val_nll(loader)


class Blob(HookedAdapterPosterior):
    """BLoB: Gaussian over LoRA A (Flipout), point-estimate B, closed-form KL; S forward passes."""

    name = "blob"
    supports_gradient_checkpointing = False
    Config = BlobConfig
    description = "BLoB: Gaussian LoRA A (std G^2, Flipout) + point B, closed-form KL, S forward passes"
    saves_state = True

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """M and B (a LoRA adapter's worth) plus G, one per entry of A."""
        g = sum(config.lora.r * m.in_features for m in target_modules(backbone, config.lora).values())
        return ResourceNeeds(trainable=lora_parameter_count(backbone, config.lora) + g)

    def build_adapter(self, backbone: Backbone) -> BlobAdapter:
        lora = self.config.lora
        return BlobAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed,
                           init_std_eps=self.config.init_std_eps)

    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> BlobHooks:
        return BlobHooks(backbone, self.adapter, self.config, n_train, batches_per_epoch)

    def sample(self, batch: dict[str, Any], num_samples: int) -> torch.Tensor:
        """Flipout draws noise per example, so ``samples_per_forward`` samples share one batched forward."""
        return sample_class_logits(self.require_backbone(), batch, num_samples,
                                   samples_per_forward=self.config.samples_per_forward)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        n_a = sum(p.numel() for p in self.adapter.M.values())
        return FitReport(trainable_params=sum(p.numel() for p in self.adapter.parameters()),
                         posterior_params=2 * n_a, train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "kl": self.adapter.kl(self.config.prior_std).item(),
                                "final_train_loss": final_train_loss(result)})
