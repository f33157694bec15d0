"""Point estimates: the zero-shot backbone, MAP LoRA (AdamW with weight decay) and MLE LoRA (no decay).

MAP: theta* = argmin_theta  -sum_i log p(y_i | x_i, theta) + (lambda/2)||theta||^2, with the
Gaussian prior realised as AdamW's decoupled weight decay (docs/methods.md). Deterministic: S = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive
from bayeslora.adapters import fit_lora_adapter
from bayeslora.backbone import Backbone
from bayeslora.config import AdapterConfig, TrainSettings
from bayeslora.data import EncodedSplit
from bayeslora.predict import collect_predictive


class ZeroShot(Posterior):
    """The pretrained model without any adapter: a reference row, not a posterior."""

    name = "zero_shot"
    description = "zero-shot backbone (no adapter), S=1"
    deterministic = True

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach(backbone)
        return FitReport()

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        with backbone.adapters_disabled():
            return collect_predictive(backbone, loader, lambda b: backbone.class_logits(b)[:, None],
                                      desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MapLora(Posterior):
    """MAP LoRA: one adapter trained by CE with weight decay; cached and shared with other methods."""

    name = "map"
    Config = AdapterConfig
    description = "MAP LoRA (AdamW + weight decay), S=1"
    deterministic = True
    weight_decay: float | None = None  # None: use train.weight_decay

    def train_settings(self) -> TrainSettings:
        if self.weight_decay is None:
            return self.config.train
        return dataclasses.replace(self.config.train, weight_decay=self.weight_decay)

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        fit = fit_lora_adapter(backbone, self.adapter_name, self.config.lora, self.train_settings(), train, val,
                               self.seed, self.artifacts)
        return FitReport(
            trainable_params=fit.trainable_params,
            posterior_params=0,
            train_steps=fit.result.steps,
            reused_cache=fit.reused,
            extra={"best_val_nll": fit.result.best_val_nll, "train_seconds": fit.result.seconds,
                   "train_tokens": fit.result.tokens, "train_peak_mem_mb": fit.result.peak_mem_mb},
        )

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        backbone.use_adapter(self.adapter_name)
        return collect_predictive(backbone, loader, lambda b: backbone.class_logits(b)[:, None], desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.require_backbone().adapter_state(self.adapter_name)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backbone = self.require_backbone()
        backbone.restore_adapter(self.adapter_name, self.config.lora, state["adapter"])


class MleLora(MapLora):
    """MLE LoRA: the same adapter trained without weight decay."""

    name = "mle"
    description = "MLE LoRA (AdamW, no weight decay), S=1"
    weight_decay = 0.0
