"""Bayesian-LoRA: inducing-weight variational posterior over LoRA factors (docs/methods.md) [code].

Every configured LoRA factor (A: r x d_in and B: d_out x r of each target module, by default q_proj and
k_proj as in the authors' code, and of the answer head) is an
:class:`~baselines.inducing_weights.InducingFactor`: a 9 x 9 inducing matrix U with a Gaussian q(U)
is mapped to the factor by the conditional mean of a Kronecker-structured Gaussian prior, plus small
conditional noise lambda eps (Matheron's rule). The update of a target module is
y = W0 x + (alpha/r) B A x, added by a forward hook (:class:`~baselines.hooked_adapter.HookedAdapter`);
the answer head's is
z = W_lm[answer_ids] h + (alpha/r) B_K A h: a LoRA on the LM head restricted to the K answer rows (the
only rows ever read), so its B factor is K x r, its rows in the order of the training set's answer
tokens (sets with other answer tokens are refused, as for the last-layer methods).

Fit, prediction and saving follow :class:`~baselines.hooked_posterior.HookedAdapterPosterior`.
Objective per minibatch (the shared training loop): mean CE under one draw of every factor plus
beta x KL / M (``kl_scaling: per_batch``, M minibatches per epoch, beta = ``kl_weight`` = 0.1: the
authors' code) or beta x KL / N (``per_example``, the ELBO per example), from epoch ``kl_start_epoch``
(2 in the authors' code) on; KL = sum over factors of KL(q(U) || p(U)) + KL(q(W|U) || p(W|U)).
The inducing locations Z and diagonals D (the prior's hyperparameters), q(U) and lambda are all
learned. Prediction: S forward passes, each with fresh draws (seeded), or ``num_samples = 0``: the
factors at E_q[U] without conditional noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bayeslora import FitReport, ResourceNeeds, distributed
from bayeslora.adapters import ClassifierHooks
from bayeslora.backbone import Backbone, target_modules
from bayeslora.config import AdapterConfig, LoraSettings, NonNegativeFloat, NonNegativeInt
from bayeslora.data import EncodedSplit
from bayeslora.training import final_train_loss

from .hooked_adapter import HEAD_KEY, HookedAdapter
from .hooked_posterior import HookedAdapterPosterior
from .inducing_weights import InducingFactor, InducingSettings, inducing_factor_parameter_count


class InducingLoraAdapter(HookedAdapter):
    """Inducing-weight LoRA factors ``A`` (r x d_in) and ``B`` (d_out x r) per target module and,
    with ``head_ids`` (the K answer tokens' vocabulary rows) and ``hidden``, for the answer head (B: K x r)."""

    def __init__(self, modules: Mapping[str, nn.Module], r: int, alpha: float, settings: InducingSettings,
                 head_ids: torch.Tensor | None = None, hidden: int | None = None, seed: int = 0,
                 device: torch.device | str | None = None):
        super().__init__(modules, head_ids)
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.factors = nn.ModuleDict()
        for key, module in self.modules_by_key.items():
            self.factors[key] = _factor_pair(module.out_features, module.in_features, r, settings, generator, device)
        if head_ids is not None:
            if hidden is None:
                raise ValueError("the answer head's factors need the hidden size")
            self.factors[HEAD_KEY] = _factor_pair(len(head_ids), hidden, r, settings, generator, device)

    @property
    def has_head(self) -> bool:
        return HEAD_KEY in self.factors

    def draw(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of ``key``: a posterior draw, or the mean factors outside :attr:`stochastic`."""
        pair = self.factors[key]
        return pair["A"](self.generator, self.stochastic), pair["B"](self.generator, self.stochastic)

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A x with one draw of (A, B) for this forward."""
        a, b = self.draw(key)
        return self.scale * (x.to(a.dtype) @ a.T) @ b.T

    def head_update(self, features: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B_K A h, (batch, K): the answer rows' LoRA update."""
        a, b = self.draw(HEAD_KEY)
        return self.scale * (features.to(a.dtype) @ a.T) @ b.T

    def inducing_factors(self) -> list[InducingFactor]:
        """Every factor: A and B of each target module, then the answer head's."""
        return [f for pair in self.factors.values() for f in pair.values()]

    def kl_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum KL(q(U)||p(U)), sum KL(q(W|U)||p(W|U))) over all factors."""
        factors = self.inducing_factors()
        with torch.autocast(factors[0].z_row.device.type, enabled=False):  # float32, as the draws
            return sum(f.kl_inducing() for f in factors), sum(f.kl_conditional() for f in factors)

    def variational_parameter_count(self) -> int:
        """Parameters of q(U) and lambda (the posterior); Z and D are the prior's hyperparameters."""
        return sum(f.variational_parameter_count() for f in self.inducing_factors())

    def mean_lambda(self) -> float:
        lams = [float(f.lam.detach()) for f in self.inducing_factors()]
        return sum(lams) / len(lams)


def _factor_pair(d_out: int, d_in: int, r: int, settings: InducingSettings, generator: torch.Generator,
                 device: torch.device | str | None) -> nn.ModuleDict:
    return nn.ModuleDict({"A": InducingFactor(r, d_in, settings, generator, device),
                          "B": InducingFactor(d_out, r, settings, generator, device)})


def parameter_count(shapes: Mapping[str, tuple[int, int]], r: int, settings: InducingSettings) -> dict[str, int]:
    """Parameters of Bayesian-LoRA on modules of (d_out, d_in) ``shapes`` and of plain LoRA on the same:
    ``bayesian_lora`` = sum over factors of M_r d_out + M_c d_in + M_r + M_c + |q(U)| + 1,
    ``lora`` = sum r (d_in + d_out), ``extra`` = their difference."""
    total = sum(inducing_factor_parameter_count(r, d_in, settings) + inducing_factor_parameter_count(d_out, r, settings)
                for d_out, d_in in shapes.values())
    lora = sum(r * (d_in + d_out) for d_out, d_in in shapes.values())
    return {"bayesian_lora": total, "lora": lora, "extra": total - lora}


def adapted_shapes(lm: nn.Module, modules: Mapping[str, nn.Module],
                   num_classes: int | None) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each target module and, with ``num_classes`` K, of the answer head (K, hidden)."""
    shapes = {key: (m.out_features, m.in_features) for key, m in modules.items()}
    if num_classes is not None:
        shapes[HEAD_KEY] = (num_classes, lm.get_output_embeddings().weight.shape[1])
    return shapes


def _default_lora() -> LoraSettings:
    return LoraSettings(target_modules=["q_proj", "k_proj"])


@dataclass
class BayesianLoraConfig(AdapterConfig):
    """Bayesian-LoRA's settings; the defaults are the authors' code's (q_proj, k_proj and the answer head;
    KL weight 0.1 per minibatch from epoch 2)."""

    lora: LoraSettings = field(default_factory=_default_lora)
    """The LoRA factors that become inducing-weight layers (default q_proj and k_proj)."""
    inducing: InducingSettings = field(default_factory=InducingSettings)
    """The inducing-weight posterior of each factor."""
    answer_head: bool = True
    """Also put the posterior over the answer head's LoRA factors (its K answer rows)."""
    kl_weight: NonNegativeFloat = 0.1
    """beta: the KL's weight."""
    kl_scaling: Literal["per_batch", "per_example"] = "per_batch"
    """per_batch: beta KL / M, M minibatches per epoch (the authors' code); per_example: beta KL / N."""
    kl_start_epoch: NonNegativeInt = 2
    """The KL term is off before this epoch (the authors' code: 2)."""

    def check(self) -> None:
        self.inducing.check()


class BayesianLoraHooks(ClassifierHooks):
    """mean CE (one draw) + the weighted KL over all inducing parameters; validation at the mean factors."""

    def __init__(self, backbone: Backbone, adapter: InducingLoraAdapter, config: BayesianLoraConfig, n_train: int,
                 batches_per_epoch: int):
        super().__init__(backbone, dict(adapter.named_parameters()))
        self.adapter, self.config = adapter, config
        self.n_train, self.batches_per_epoch = n_train, batches_per_epoch

    def param_groups(self) -> list[dict[str, Any]]:
        """No weight decay (the KL is the regulariser). The lambdas' group is left out of the gradient-norm
        clipping: the conditional KL gives each rho a gradient of about d_out d_in / N, thousands of times
        the likelihood's, and clipping the joint norm would shrink every other step to nothing."""
        rhos = [f.rho for f in self.adapter.inducing_factors() if isinstance(f.rho, nn.Parameter)]
        rho_ids = {id(p) for p in rhos}
        rest = [p for p in self.adapter.parameters() if id(p) not in rho_ids]
        groups = [{"params": rest, "weight_decay": 0.0}]
        return groups + ([{"params": rhos, "weight_decay": 0.0, "clip": False}] if rhos else [])

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.adapter.answer_logits(self.backbone, batch)

    def kl_scale(self, step: int) -> float:
        """beta / M or beta / N, and 0 before ``kl_start_epoch`` (epoch of optimiser step ``step``)."""
        per_step = self.config.train.grad_accum * distributed.world_size()
        if step * per_step < self.config.kl_start_epoch * self.batches_per_epoch:
            return 0.0
        size = self.batches_per_epoch if self.config.kl_scaling == "per_batch" else self.n_train
        return self.config.kl_weight / size

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        logits = self.logits(batch)
        nll = F.cross_entropy(logits, batch["labels"].to(logits.device))
        scale = self.kl_scale(step)
        if scale == 0.0:
            return nll
        kl_u, kl_w = self.adapter.kl_terms()
        return nll + scale * (kl_u + kl_w)

    def val_nll(self, loader: DataLoader) -> float:
        with self.adapter.mean_weights():
            return super().val_nll(loader)


class BayesianLora(HookedAdapterPosterior):
    """Inducing-point (sparse-GP style) variational posterior over LoRA factors; S forward passes."""

    name = "bayesian_lora"
    supports_gradient_checkpointing = False
    Config = BayesianLoraConfig
    description = "Bayesian-LoRA: inducing-weight (9x9 U, Kronecker prior, Matheron noise) posterior over LoRA factors"
    saves_state = True

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """Every inducing-weight parameter (:meth:`count_parameters`) trains."""
        return ResourceNeeds(trainable=cls.count_parameters(backbone, config, num_classes)["bayesian_lora"])

    def build_adapter(self, backbone: Backbone) -> InducingLoraAdapter:
        lora = self.config.lora
        head_ids = self.answer_ids if self.config.answer_head else None
        return InducingLoraAdapter(target_modules(backbone, lora), lora.r, lora.alpha, self.config.inducing,
                                   head_ids=head_ids, hidden=backbone.hidden_size, seed=self.seed,
                                   device=backbone.device)

    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> BayesianLoraHooks:
        return BayesianLoraHooks(backbone, self.adapter, self.config, n_train, batches_per_epoch)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.adapter.answer_logits(self.require_backbone(), batch)

    @classmethod
    def count_parameters(cls, backbone: Backbone, config: Any = None, num_classes: int = 4) -> dict[str, int]:
        """{bayesian_lora, lora, extra} parameter counts on ``backbone`` for K = ``num_classes`` answers,
        without building anything (a :func:`~bayeslora.meta.meta_backbone` of a 7B config works: only module
        shapes are read)."""
        config = cls.make_config(config)
        modules = target_modules(backbone, config.lora)
        shapes = adapted_shapes(backbone.lm, modules, num_classes if config.answer_head else None)
        return parameter_count(shapes, config.lora.r, config.inducing)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        counts = self.count_parameters(backbone, self.config, len(self.answer_ids))
        with torch.no_grad():
            kl_u, kl_w = self.adapter.kl_terms()
        return FitReport(trainable_params=counts["bayesian_lora"],
                         posterior_params=self.adapter.variational_parameter_count(), train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "final_train_loss": final_train_loss(result),
                                "extra_params_over_lora": counts["extra"], "lora_params": counts["lora"],
                                "kl_inducing": float(kl_u), "kl_conditional": float(kl_w),
                                "mean_lambda": self.adapter.mean_lambda()})
