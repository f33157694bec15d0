"""Point estimates: the zero-shot backbone, MAP LoRA (AdamW with weight decay) and MLE LoRA (no decay).

MAP: theta* = argmin_theta  -sum_i log p(y_i | x_i, theta) + (lambda/2)||theta||^2, with the
Gaussian prior realised as AdamW's decoupled weight decay (docs/methods.md). Deterministic: S = 1.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive
from bayeslora.adapters import MapAdapter, map_fit_report
from bayeslora.backbone import Backbone
from bayeslora.config import AdapterConfig
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

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.map = MapAdapter(self, weight_decay=self.weight_decay)

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        return map_fit_report(self.map.fit(backbone, train, val))

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        return map_predict(self.map, loader, self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.map.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.map.restore(state["adapter"])


def map_predict(adapter: MapAdapter, loader: DataLoader, desc: str) -> Predictive:
    """The deterministic predictive (S = 1) of a MAP adapter."""
    backbone = adapter.use()
    return collect_predictive(backbone, loader, lambda b: backbone.class_logits(b)[:, None], desc=desc)


class MleLora(MapLora):
    """MLE LoRA: the same adapter trained without weight decay."""

    name = "mle"
    description = "MLE LoRA (AdamW, no weight decay), S=1"
    weight_decay = 0.0
