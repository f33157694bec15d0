"""IVON-LoRA: variational learning of the LoRA parameters with the IVON optimiser (``ivon-opt``,
Shen et al. 2024; docs/methods.md).

IVON replaces AdamW in the shared training loop. Its posterior is a diagonal Gaussian over every LoRA
parameter, q(theta) = N(m, diag(1 / (lambda (h + delta)))), with the mean m (the adapter's weights), the
Hessian estimate h (per parameter, started at ``hess_init``) kept by the optimiser, lambda the effective
sample size ``ess`` and delta its weight decay. Each minibatch's forward and backward run at a parameter
sample drawn by ``IVON.sampled_params(train=True)``; IVON's step then updates m and h from the sampled
gradients (its reparameterisation-trick Hessian estimate). With gradient accumulation each minibatch is
one Monte Carlo sample of the step. IVON clips its own update (``clip_radius``); the loop's gradient-norm
clipping does not reach it. Prediction averages S parameter sets drawn from q by the optimiser
(``sampled_params(train=False)``, seeded, the same draws for every example), or ``num_samples = 0``: m.
Defaults are BayesAdapt's IVON trainer's: lr 0.01, beta2 0.9995, delta 0.1, clip radius 0.005,
hess_init 0.05, lambda = 5000 sqrt(N).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ivon
import torch
from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive, ResourceNeeds, distributed
from bayeslora.adapters import ClassifierHooks
from bayeslora.backbone import Backbone, lora_parameter_count
from bayeslora.config import AdapterConfig, Fraction, NonNegativeFloat, PositiveFloat, TrainSettings
from bayeslora.data import EncodedSplit
from bayeslora.predict import predict_with_weights
from bayeslora.training import TrainResult, final_train_loss, train_seeded


@dataclass
class IvonConfig(AdapterConfig):
    """IVON's settings (the optimiser's arguments); ``train`` supplies the schedule, steps and batches."""

    lr: PositiveFloat | None = 0.01
    """IVON's peak learning rate (None: train.lr, which is tuned for AdamW)."""
    ess: PositiveFloat | None = None
    """lambda, the effective sample size (None: ess_per_sqrt_n * sqrt(N), N the training examples)."""
    ess_per_sqrt_n: PositiveFloat = 5000.0
    """lambda / sqrt(N) when ``ess`` is None."""
    hess_init: PositiveFloat = 0.05
    """The Hessian estimate's initial value h0 (the initial posterior std is 1/sqrt(lambda (h0 + delta)))."""
    beta1: Fraction = 0.9
    """Momentum of the gradient."""
    beta2: Fraction = 0.9995
    """Momentum of the Hessian estimate."""
    ivon_weight_decay: NonNegativeFloat = 0.1
    """delta, IVON's weight decay: the prior is N(0, 1/(lambda delta)) (train.weight_decay is AdamW's and unused)."""
    clip_radius: PositiveFloat = 0.005
    """IVON clips each coordinate of its preconditioned update to this radius."""


def posterior_std(optimizer: ivon.IVON) -> torch.Tensor:
    """1 / sqrt(lambda (h + delta)), flattened over the optimiser's parameters."""
    return torch.cat([(g["ess"] * (g["hess"] + g["weight_decay"])).rsqrt() for g in optimizer.param_groups])


class IvonHooks(ClassifierHooks):
    """Cross-entropy at IVON's parameter samples; the optimiser is IVON over the LoRA parameters."""

    def __init__(self, backbone: Backbone, params: dict[str, torch.nn.Parameter], config: IvonConfig, ess: float):
        super().__init__(backbone, params)
        self.config, self.ess = config, ess
        self.optimizer: ivon.IVON | None = None

    def make_optimizer(self, groups: list[dict[str, Any]], settings: TrainSettings) -> ivon.IVON:
        self.optimizer = make_ivon(groups, self.config, self.ess)
        return self.optimizer

    @contextlib.contextmanager
    def step_context(self) -> Iterator[None]:
        """The minibatch runs at a fresh sample; its gradient, scaled back from the loop's 1/grad_accum, is
        handed to IVON when the sample is restored (each minibatch one Monte Carlo sample of the step)."""
        params = list(self.params.values())
        for p in params:
            p.grad = None
        with super().step_context(), self.optimizer.sampled_params(train=True):
            yield
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(self.config.train.grad_accum)

    def snapshot(self) -> dict[str, torch.Tensor]:
        state = super().snapshot()
        state.update({f"hess.{i}": g["hess"].clone() for i, g in enumerate(self.optimizer.param_groups)})
        return state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for i, g in enumerate(self.optimizer.param_groups):
            g["hess"] = state[f"hess.{i}"].clone()
        super().restore({k: v for k, v in state.items() if not k.startswith("hess.")})


def make_ivon(groups: list[dict[str, Any]], config: IvonConfig, ess: float) -> ivon.IVON:
    """The ``ivon.IVON`` optimiser with the method's settings (``lr``, else ``train.lr``; synchronised across
    processes when there are several)."""
    lr = config.train.lr if config.lr is None else config.lr
    return ivon.IVON(groups, lr=lr, ess=ess, hess_init=config.hess_init, beta1=config.beta1, beta2=config.beta2,
                     weight_decay=config.ivon_weight_decay, clip_radius=config.clip_radius,
                     sync=distributed.world_size() > 1)


class IvonLora(Posterior):
    """IVON-LoRA: a LoRA adapter trained by IVON; its Gaussian posterior predicts with S parameter samples."""

    name = "ivon"
    Config = IvonConfig
    description = "IVON-LoRA: LoRA trained by the IVON optimiser (ivon-opt), S sampled parameter sets"
    saves_state = True

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """A LoRA adapter's worth; IVON's momentum and Hessian take the place of AdamW's two moments."""
        return ResourceNeeds(trainable=lora_parameter_count(backbone, config.lora, num_classes))

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.optimizer: ivon.IVON | None = None
        self.ess = float("nan")
        self.train_result: TrainResult | None = None

    def effective_sample_size(self, n_train: int) -> float:
        return self.config.ess or self.config.ess_per_sqrt_n * math.sqrt(n_train)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        backbone.add_lora(self.adapter_name, self.config.lora, seed=self.seed, answer_ids=train_split.answer_ids)
        params = backbone.lora_parameters(self.adapter_name)
        self.ess = self.effective_sample_size(len(train_split))
        hooks = IvonHooks(backbone, params, self.config, self.ess)
        result = self.train_result = train_seeded(lambda _: hooks, train_split, val, self.config.train, self.seed,
                                                  backbone.device, desc=f"train {self.name}")
        self.optimizer = hooks.optimizer
        n = sum(p.numel() for p in params.values())
        std = posterior_std(self.optimizer)
        return FitReport(trainable_params=n, posterior_params=2 * n, train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "ess": self.ess, "posterior_std_mean": float(std.mean()),
                                "final_train_loss": final_train_loss(result)})

    def draws(self, num_samples: int) -> list[dict[str, torch.Tensor]]:
        """S parameter sets from IVON's posterior (``sampled_params``; seeded, the global RNG left as it was),
        or for ``num_samples = 0`` the mean."""
        backbone = self.require_backbone()
        params = backbone.lora_parameters(self.adapter_name)
        if num_samples == 0:
            return [{k: p.detach().clone() for k, p in params.items()}]
        devices = [backbone.device] if backbone.device.type == "cuda" else []
        draws = []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for _ in range(num_samples):
                with self.optimizer.sampled_params(train=False):
                    draws.append({k: p.detach().clone() for k, p in params.items()})
        return draws

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        return predict_with_weights(self.require_backbone(), self.adapter_name, self.draws(num_samples), loader,
                                    self.name)

    def state_dict(self) -> dict[str, Any]:
        backbone = self.require_backbone()
        state = backbone.adapter_state(self.adapter_name)
        return {"adapter": state, "ess": self.ess,
                "hess": [g["hess"].detach().cpu() for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backbone = self.require_backbone()
        backbone.restore_adapter(self.adapter_name, self.config.lora, state["adapter"])
        params = backbone.lora_parameters(self.adapter_name)
        self.ess = float(state["ess"])
        self.optimizer = make_ivon([{"params": list(params.values())}], self.config, self.ess)
        for group, hess in zip(self.optimizer.param_groups, state["hess"], strict=True):
            group["hess"] = hess.to(device=group["hess"].device, dtype=group["hess"].dtype)
