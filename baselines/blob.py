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

Training (:mod:`baselines.variational_training`, shared with ScalaBL): AdamW on the mean CE over M, G and
B, and, as the reference, the KL stepped by its own SGD at ``kl_lr`` (0.01, the authors' scripts) with the
authors' per-minibatch KL reweighting cycle. Prediction: S forward passes with fresh noise (seeded), or
``num_samples = 0``: the mean weights (no noise), S = 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from bayeslora import FitReport, ResourceNeeds
from bayeslora.backbone import (
    HEAD_TARGET,
    Backbone,
    lora_parameter_count,
    target_modules,
)
from bayeslora.config import PositiveFloat
from bayeslora.data import EncodedSplit
from bayeslora.training import final_train_loss

from .hooked_adapter import HEAD_KEY, HookedAdapter
from .variational_training import VariationalAdapterPosterior, VariationalTrainingConfig, gaussian_kl


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
        for key, (d_out, d_in, device) in self.layer_shapes(hidden).items():
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

    def optimizer_groups(self, config: BlobConfig) -> list[dict[str, Any]]:
        """AdamW groups: M and G without weight decay (G at ``std_lr``), B with the training's decay."""
        std_lr = config.std_lr or config.train.lr
        return [{"params": list(self.M.values()), "weight_decay": 0.0},
                {"params": list(self.B.values())},
                {"params": list(self.G.values()), "lr": std_lr, "weight_decay": 0.0}]

    def kl_parameters(self) -> list[nn.Parameter]:
        """What the KL depends on: M and G."""
        return [*self.M.values(), *self.G.values()]

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
class BlobConfig(VariationalTrainingConfig):
    """BLoB's settings; the defaults are the authors' (their scripts' ``kl_lr``)."""

    init_std_eps: PositiveFloat = 0.05
    """epsilon: G starts uniform in (epsilon/sqrt 2, epsilon)."""
    flipout: Literal["token", "example"] = "token"
    """Flipout signs drawn per token (the reference) or per example."""
    std_lr: PositiveFloat | None = None
    """Learning rate of G in the CE optimiser (None: train.lr, as the reference)."""


class Blob(VariationalAdapterPosterior):
    """BLoB: Gaussian over LoRA A (Flipout), point-estimate B, closed-form KL; S forward passes."""

    name = "blob"
    Config = BlobConfig
    description = "BLoB: Gaussian LoRA A (std G^2, Flipout) + point B, closed-form KL, S forward passes"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """M and B (a LoRA adapter's worth, the answer head's K rows included) plus G, one per entry of A."""
        g = sum(config.lora.r * m.in_features for m in target_modules(backbone, config.lora).values())
        head = config.lora.r * backbone.hidden_size if HEAD_TARGET in config.lora.target_modules else 0
        return ResourceNeeds(trainable=lora_parameter_count(backbone, config.lora, num_classes) + g + head)

    def build_adapter(self, backbone: Backbone) -> BlobAdapter:
        lora = self.config.lora
        return BlobAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed,
                           init_std_eps=self.config.init_std_eps, flipout=self.config.flipout, head_ids=self.head_ids(),
                           hidden=backbone.hidden_size)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        n_a = sum(p.numel() for p in self.adapter.M.values())
        return FitReport(trainable_params=sum(p.numel() for p in self.adapter.parameters()),
                         posterior_params=2 * n_a, train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "kl": self.adapter.kl(self.config.prior_std).item(),
                                "final_train_loss": final_train_loss(result)})
