"""SWAG-LoRA and B-LoRA-XS: a SWAG Gaussian over adapter weights (docs/methods.md).

Both run the shared training loop twice: a burn-in, then an SWA phase at the constant learning rate
``swag.lr`` for ``swag.epochs`` epochs, during which :class:`SwagHooks` (a per-step callback)
collects a snapshot of the adapter weights at the end of every epoch (``swag.collect: epoch``, the
reference code's schedule) or every ``swag.collect_every`` optimiser steps (``steps``, default: K + 1
snapshots spread over the phase, for short budgets) into
:class:`~baselines.swag.SwagStatistics`. Prediction draws S weight vectors
theta_s = mean + sqrt(s) (sigma z1 + D^T z2 / sqrt(K-1)) once (seeded) and evaluates every
example under each: S backbone passes per example.

- ``swag_lora``: standard LoRA (peft) with SWAG over all A and B. The burn-in is the shared MAP
  adapter (trained once, cached, the same as ``map``'s); samples are evaluated with
  ``Backbone.class_logits_with`` (torch.func.functional_call), so nothing is written into the model.
- ``blora_xs``: LoRA-XS (:mod:`baselines.lora_xs`: frozen truncated-SVD factors, only the r x r
  R of each module trains) with SWAG over the concatenated R's: the smallest posterior of the
  library. The burn-in trains R for ``train.epochs`` with early stopping on validation NLL.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive, ResourceNeeds
from bayeslora.adapters import ClassifierHooks, fit_lora_adapter
from bayeslora.backbone import Backbone, lora_parameter_count, target_modules
from bayeslora.config import AdapterConfig, TrainSettings
from bayeslora.data import EncodedSplit, make_loader
from bayeslora.predict import collect_predictive
from bayeslora.training import TrainResult, train, train_seeded

from .lora_xs import LoraXsAdapter, lora_xs_factors
from .swag import SwagSettings, SwagStatistics, flatten, unflatten


@dataclass
class SwagConfig(AdapterConfig):
    """Adapter + training settings of the burn-in, and ``swag``: the SWA phase and the Gaussian."""

    swag: SwagSettings = field(default_factory=SwagSettings)
    """The SWA phase and the SWAG Gaussian."""

    def check(self) -> None:
        self.swag.check()


@dataclass
class BLoraXsConfig(SwagConfig):
    """``init_std``: std of R at init (LoRA-XS: 1e-5). ``lora.r`` is the SVD rank, ``lora.alpha``
    the scale alpha/r; ``lora.dropout`` is not used."""

    init_std: float = 1e-5
    """Std of R at init."""


class SwagHooks(ClassifierHooks):
    """Cross-entropy, plus a SWAG snapshot of the parameters at the end of every epoch (``swag.collect:
    epoch``; the first step that ends in a new epoch, so gradient accumulation cannot skip one) or every
    ``swag.interval(total)`` steps."""

    def __init__(self, backbone: Backbone, params: dict[str, torch.nn.Parameter], stats: SwagStatistics,
                 swag: SwagSettings):
        super().__init__(backbone, params)
        self.stats, self.swag = stats, swag
        self.collect_every = 1
        self.epochs_collected = 0

    def on_train_begin(self, total_steps: int) -> None:
        self.collect_every = self.swag.interval(total_steps)

    def due(self, step: int, epoch: float) -> bool:
        """Whether the step that just ended takes a snapshot."""
        if self.swag.collect == "epoch":
            finished = math.floor(epoch + 1e-9)
            if finished > self.epochs_collected:
                self.epochs_collected = finished
                return True
            return False
        return step % self.collect_every == 0

    def on_step_end(self, step: int, epoch: float) -> None:
        if self.due(step, epoch):
            self.stats.collect(flatten(self.params))


def swa_settings(train_settings: TrainSettings, swag: SwagSettings) -> TrainSettings:
    """The SWA phase: ``swag.epochs`` (not the burn-in's step budget), constant learning rate, no warm-up,
    no early stopping."""
    return dataclasses.replace(train_settings, epochs=swag.epochs, max_steps=None, lr=swag.lr or train_settings.lr,
                               schedule="constant", warmup_ratio=0.0, early_stopping_patience=None)


class _SwagPosterior(Posterior):
    """Shared SWA phase, sampling and state of the two SWAG methods."""

    Config = SwagConfig
    saves_state = True

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.stats: SwagStatistics | None = None
        self.swa_result: TrainResult | None = None

    # subclasses: the trainable tensors, and a context in which the backbone uses given values of them
    def weights(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def sample_logits(self, values: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def run_swa_phase(self, backbone: Backbone, train_split: EncodedSplit) -> None:
        swag = self.config.swag
        params = self.weights()
        self.stats = SwagStatistics(sum(p.numel() for p in params.values()), swag.max_rank, swag.var_clamp)
        loader = make_loader(train_split, self.config.train.batch_size, shuffle=True, seed=self.seed + 10_000)
        hooks = SwagHooks(backbone, params, self.stats, swag)
        self.swa_result = train(hooks, loader, swa_settings(self.config.train, swag), backbone.device,
                                desc=f"swa {self.name}")
        if self.stats.n == 0:
            raise RuntimeError(f"{self.name}: the SWA phase ran {self.swa_result.steps} steps and collected no "
                               f"snapshot; lower swag.collect_every (now {hooks.collect_every}) or raise swag.epochs")

    def swag_report(self) -> dict[str, Any]:
        """FitReport extras of the SWA phase (after :meth:`run_swa_phase`)."""
        steps = self.swa_result.steps
        swag = self.config.swag
        return {"swa_steps": steps, "snapshots": self.stats.n, "swag_rank": self.stats.rank,
                "posterior_dim": self.stats.dim,
                "collect_every": "epoch" if swag.collect == "epoch" else str(swag.interval(steps)),
                "swa_seconds": self.swa_result.seconds}

    def draws(self, num_samples: int) -> list[dict[str, torch.Tensor]]:
        """S weight samples (S = 0 or scale 0: the SWA mean), seeded by the run's seed."""
        swag = self.config.swag
        like = self.weights()
        if num_samples == 0:
            return [unflatten(self.stats.mean.float(), like)]
        generator = torch.Generator().manual_seed(self.seed)
        return [unflatten(self.stats.sample(swag.scale, generator, swag.covariance), like)
                for _ in range(num_samples)]

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        draws = self.draws(num_samples)

        def sample(batch: dict[str, Any]) -> torch.Tensor:
            return torch.stack([self.sample_logits(values, batch) for values in draws], dim=1)

        return collect_predictive(backbone, loader, sample, desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"swag": self.stats.state_dict(), "weights": {k: v.detach().cpu() for k, v in self.weights().items()}}


class SwagLora(_SwagPosterior):
    """SWAG over the A and B of a standard LoRA adapter, started from the shared MAP adapter."""

    name = "swag_lora"
    description = "SWAG over LoRA A,B (SWA phase from the MAP adapter), S forward passes"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """MAP adapter, then the SWA phase; SWAG keeps the mean, second moment and K deviations."""
        lora = lora_parameter_count(backbone, config.lora, num_classes)
        return ResourceNeeds(trainable=lora, stored=(config.swag.max_rank + 2) * lora, training_runs=2)

    def weights(self) -> dict[str, torch.nn.Parameter]:
        return self.require_backbone().lora_parameters(self.adapter_name)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        fit = fit_lora_adapter(backbone, self.adapter_name, self.config.lora, self.config.train, train_split, val,
                               self.seed, self.artifacts)
        backbone.use_adapter(self.adapter_name)
        self.run_swa_phase(backbone, train_split)
        return FitReport(trainable_params=fit.trainable_params,
                         posterior_params=self.stats.num_stored(), train_steps=fit.result.steps + self.swa_result.steps,
                         reused_cache=fit.reused, extra={"best_val_nll": fit.result.best_val_nll, **self.swag_report()})

    def sample_logits(self, values: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        return self.require_backbone().class_logits_with(self.adapter_name, values, batch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backbone = self.require_backbone()
        backbone.restore_adapter(self.adapter_name, self.config.lora, state["weights"])
        self.stats = SwagStatistics.from_state(state["swag"])


class BLoraXs(_SwagPosterior):
    """B-LoRA-XS: LoRA-XS (frozen SVD factors, trainable r x r R) with SWAG over all R."""

    name = "blora_xs"
    adapts_lm_head = False
    supports_gradient_checkpointing = False
    Config = BLoraXsConfig
    description = "B-LoRA-XS: LoRA-XS (SVD factors frozen, r x r trained) + SWAG over R, S forward passes"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """r x r R per module trained; SWAG moments and K deviations over them; frozen SVD factors."""
        modules = target_modules(backbone, config.lora)
        r_params = len(modules) * config.lora.r**2
        frozen = lora_parameter_count(backbone, config.lora, num_classes)
        return ResourceNeeds(trainable=r_params, stored=(config.swag.max_rank + 2) * r_params + frozen,
                             training_runs=2)

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.adapter: LoraXsAdapter | None = None

    def weights(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.adapter.R.items())

    def _build(self, backbone: Backbone) -> None:
        lora = self.config.lora
        factors = lora_xs_factors(backbone, lora, self.artifacts)
        self.adapter = LoraXsAdapter(target_modules(backbone, lora), factors, lora.r, lora.alpha, seed=self.seed,
                                     init_std=self.config.init_std)
        backbone.check_above_trunk(self.name, min(self.adapter.layer_indices()))

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        self._build(backbone)
        settings = self.config.train
        with backbone.adapters_disabled(), self.adapter.active():
            burn_in = train_seeded(lambda _: ClassifierHooks(backbone, self.weights()), train_split, val, settings,
                                   self.seed, backbone.device, desc=f"train {self.name}")
            self.run_swa_phase(backbone, train_split)
        n_trainable = sum(p.numel() for p in self.weights().values())
        return FitReport(trainable_params=n_trainable,
                         posterior_params=self.stats.num_stored(), train_steps=burn_in.steps + self.swa_result.steps,
                         extra={"best_val_nll": burn_in.best_val_nll, "train_seconds": burn_in.seconds,
                                **self.swag_report()})

    def sample_logits(self, values: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        backbone = self.require_backbone()
        with backbone.adapters_disabled(), self.adapter.active(), self.adapter.using_values(values):
            return backbone.class_logits(batch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build(self.require_backbone())
        with torch.no_grad():
            for k, v in state["weights"].items():
                self.adapter.R[k].copy_(v)
        self.stats = SwagStatistics.from_state(state["swag"])
