"""ScalaBL: Bayesian LoRA by stochastic variational inference in an r-dimensional subspace
(docs/methods.md), as the authors' BayesAdapt code builds it.

Per adapted layer the LoRA factor A (r x d_in) is written A = diag(s) V_h: at init the SVD of a
peft-initialised A0 = U diag(s0) V_h gives s0 and V_h (r x d_in, orthonormal rows), so A starts at
diag(s0) V_h = U^T A0. Only the r singular values are random,

    q(s_i) = N(mu_i, sigma_i^2),  mu = exp(log_mu),  sigma = exp(log_sigma),  p(s_i) = N(0, prior_std^2 = 1),

with log_mu = log s0 and sigma0 ~ U(eps/sqrt 2, eps), eps = ``init_std_eps`` = 0.05; V_h and B (zero
init) are point estimates trained with them. The update, added by a forward hook
(:class:`~baselines.hooked_adapter.HookedAdapter`), is

    y = W0 x + (alpha/r) B diag(mu + sigma * eps) V_h x,   eps ~ N(0, I_r),

with one eps per forward pass (``noise: forward``, the reference) or per example (``example``). With
``lm_head`` among the targets the answer head's K rows get the same layer (A: r x H, B_K: K x r). The KL
is closed form. By default (``kl_direction: reference``) it is the expression the authors' code
evaluates, which is the reverse divergence

    KL(p || q) = sum_i log(sigma_i / prior_std) + (prior_std^2 + mu_i^2) / (2 sigma_i^2) - 1/2;

``elbo`` uses the ELBO's KL(q || p) = sum_i log(prior_std / sigma_i) + (sigma_i^2 + mu_i^2) / (2 prior_std^2)
- 1/2 (docs/methods.md gives the measured difference). Training is BLoB's
(:mod:`baselines.variational_training`): AdamW on the mean CE, the KL stepped by its own SGD at ``kl_lr``
(0.2, the reference's setting) with the per-minibatch reweighting cycle. The posterior has r numbers per
adapted module (2r variational parameters). Prediction: S forward passes with fresh noise (seeded), or
``num_samples = 0``: mu.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from bayeslora import ConfigError, FitReport, ResourceNeeds
from bayeslora.backbone import HEAD_TARGET, Backbone, lora_parameter_count, target_modules
from bayeslora.config import PositiveFloat
from bayeslora.data import EncodedSplit
from bayeslora.training import final_train_loss

from .hooked_adapter import HEAD_KEY, HookedAdapter
from .variational_training import VariationalAdapterPosterior, VariationalTrainingConfig, gaussian_kl


def singular_value_init(r: int, d_in: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(s0, V_h): the SVD A0 = U diag(s0) V_h of an r x d_in A0 initialised as peft's LoRA A
    (Kaiming uniform, bound 1/sqrt d_in)."""
    if r > d_in:
        raise ConfigError(f"scalabl: rank r={r} exceeds the input size {d_in} of an adapted layer; lower lora.r")
    bound = 1.0 / math.sqrt(d_in)
    a0 = (torch.rand(r, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    _, s, vh = torch.linalg.svd(a0, full_matrices=False)
    return s.float(), vh.float().contiguous()


class ScalablAdapter(HookedAdapter):
    """log_mu, log_sigma (the Gaussian over the singular values), V_h and B for every target module."""

    def __init__(self, modules: Mapping[str, nn.Module], r: int, alpha: float, seed: int = 0,
                 init_std_eps: float = 0.05, noise: str = "forward", kl_direction: str = "reference",
                 head_ids: torch.Tensor | None = None, hidden: int | None = None):
        super().__init__(modules, head_ids)
        self.noise, self.kl_direction = noise, kl_direction
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.log_mu, self.log_sigma = nn.ParameterDict(), nn.ParameterDict()
        self.Vh, self.B = nn.ParameterDict(), nn.ParameterDict()
        for key, (d_out, d_in, device) in self.layer_shapes(hidden).items():
            s0, vh = singular_value_init(r, d_in, generator)
            low = init_std_eps / math.sqrt(2)
            sigma0 = low + (init_std_eps - low) * torch.rand(r, generator=generator)
            self.log_mu[key] = nn.Parameter(s0.log().to(device))
            self.log_sigma[key] = nn.Parameter(sigma0.log().to(device))
            self.Vh[key] = nn.Parameter(vh.to(device))
            self.B[key] = nn.Parameter(torch.zeros(d_out, r, device=device))

    def mean(self, key: str) -> torch.Tensor:
        """mu = exp(log_mu), the posterior mean of the r singular values."""
        return self.log_mu[key].exp()

    def std(self, key: str) -> torch.Tensor:
        return self.log_sigma[key].exp()

    def a_matrix(self, key: str) -> torch.Tensor:
        """A = diag(mu) V_h, the mean adapter's A."""
        return self.mean(key)[:, None] * self.Vh[key]

    def head_update(self, features: torch.Tensor) -> torch.Tensor:
        return self.update(HEAD_KEY, features)

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B diag(s) V_h x with s = mu (+ sigma * eps when stochastic)."""
        vh = self.Vh[key]
        projected = x.to(vh.dtype) @ vh.T
        s = self.mean(key)
        if self.stochastic:
            shape = (s.shape[0],) if self.noise == "forward" else (x.shape[0],) + (1,) * (x.dim() - 2) + s.shape
            eps = torch.randn(shape, generator=self.generator, device=s.device, dtype=s.dtype)
            s = s + self.std(key) * eps
        return self.scale * (projected * s) @ self.B[key].T

    def kl(self, prior_std: float) -> torch.Tensor:
        """sum_i KL(N(mu_i, sigma_i^2) || N(0, prior_std^2)); with ``reference`` direction
        sum_i KL(N(0, prior_std^2) || N(mu_i, sigma_i^2))."""
        if self.kl_direction == "elbo":
            return sum(gaussian_kl(self.mean(k), self.std(k), prior_std) for k in self.log_mu)
        total = torch.zeros((), device=next(iter(self.log_mu.values())).device)
        for k in self.log_mu:
            mu, sigma = self.mean(k), self.std(k)
            prior = torch.distributions.Normal(torch.zeros_like(mu), torch.full_like(mu, prior_std))
            total = total + torch.distributions.kl_divergence(prior, torch.distributions.Normal(mu, sigma)).sum()
        return total

    def optimizer_groups(self, config: ScalablConfig) -> list[dict[str, Any]]:
        """AdamW groups: the singular values' mean and std without weight decay, V_h and B with the training's."""
        return [{"params": [*self.log_mu.values(), *self.log_sigma.values()], "weight_decay": 0.0},
                {"params": [*self.Vh.values(), *self.B.values()]}]

    def kl_parameters(self) -> list[nn.Parameter]:
        """What the KL depends on: log_mu and log_sigma."""
        return [*self.log_mu.values(), *self.log_sigma.values()]

    def posterior_dims(self) -> int:
        """r per adapted module: the dimension of the posterior."""
        return sum(p.numel() for p in self.log_mu.values())


@dataclass
class ScalablConfig(VariationalTrainingConfig):
    """ScalaBL's settings; the defaults are the authors' (BayesAdapt's ScalaBL wrapper and VI optimiser)."""

    prior_std: PositiveFloat = 1.0
    """Std of the zero-mean Gaussian prior on each singular value."""
    kl_lr: PositiveFloat = 0.2
    """Learning rate of the separate KL optimiser (SGD, the training schedule)."""
    init_std_eps: PositiveFloat = 0.05
    """epsilon: sigma starts uniform in (epsilon/sqrt 2, epsilon)."""
    noise: Literal["forward", "example"] = "forward"
    """One draw of the singular values per forward pass (the reference) or one per example."""
    kl_direction: Literal["reference", "elbo"] = "reference"
    """reference: KL(p || q), the expression the authors' code evaluates; elbo: KL(q || p), the ELBO's term."""

    def check(self) -> None:
        if self.samples_per_forward > 1 and self.noise == "forward":
            raise ConfigError("scalabl samples_per_forward > 1 needs noise: example (with noise: forward the "
                              "stacked copies would share one draw)")


class Scalabl(VariationalAdapterPosterior):
    """ScalaBL: A = diag(s) V_h with a Gaussian over the r singular values s, point V_h and B; S forward passes."""

    name = "scalabl"
    Config = ScalablConfig
    description = "ScalaBL: Gaussian over the r singular values of A = diag(s) V_h, point V_h and B, S forward passes"

    @classmethod
    def count_parameters(cls, backbone: Backbone, config: Any = None, num_classes: int = 4) -> dict[str, int]:
        """{scalabl, lora, extra, posterior_dims} on ``backbone`` for K = ``num_classes`` answers, from module
        shapes alone: a LoRA adapter's worth (V_h in A's place, the answer head's K rows included) plus the
        2r numbers (mean and std of r singular values) of each adapted module."""
        config = cls.make_config(config)
        lora = lora_parameter_count(backbone, config.lora, num_classes)
        modules = len(target_modules(backbone, config.lora)) + (HEAD_TARGET in config.lora.target_modules)
        dims = config.lora.r * modules
        return {"scalabl": lora + 2 * dims, "lora": lora, "extra": 2 * dims, "posterior_dims": dims}

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        return ResourceNeeds(trainable=cls.count_parameters(backbone, config, num_classes)["scalabl"])

    def build_adapter(self, backbone: Backbone) -> ScalablAdapter:
        lora = self.config.lora
        return ScalablAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed,
                              init_std_eps=self.config.init_std_eps, noise=self.config.noise,
                              kl_direction=self.config.kl_direction, head_ids=self.head_ids(),
                              hidden=backbone.hidden_size)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        dims = self.adapter.posterior_dims()
        sigma = torch.cat([self.adapter.std(k).detach().flatten() for k in self.adapter.log_sigma])
        return FitReport(trainable_params=sum(p.numel() for p in self.adapter.parameters()),
                         posterior_params=2 * dims, train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "posterior_dims": dims, "kl": self.adapter.kl(self.config.prior_std).item(),
                                "sigma_mean": float(sigma.mean()),
                                "final_train_loss": final_train_loss(result)})
