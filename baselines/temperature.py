"""Temperature scaling of the MAP adapter (docs/methods.md).

T* = argmin_T  -sum_{(x,y) in val} log softmax(z(x) / T)_y, optimised over log T by L-BFGS from
T = 1; the fitted T is kept only if it lowers the validation NLL (so it never raises it).
Prediction: z(x) / T*. Deterministic: S = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bayeslora import ConfigError, FitReport, Posterior, Predictive
from bayeslora.adapters import MapAdapter, map_fit_report
from bayeslora.backbone import Backbone
from bayeslora.config import PositiveInt
from bayeslora.data import EncodedSplit, make_loader

from .map_lora import AdapterConfig, map_predict


@dataclass
class TemperatureConfig(AdapterConfig):
    """``max_iter``: L-BFGS iterations for log T."""

    max_iter: PositiveInt = 100
    """L-BFGS iterations of the temperature fit."""


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> tuple[float, float, float]:
    """(T*, NLL at T=1, NLL at T*) for (N, K) logits; T* = 1 unless it lowers the NLL."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    before = F.cross_entropy(logits, labels).item()
    temperature = float(log_t.detach().exp())
    after = F.cross_entropy(logits / temperature, labels).item()
    if not (after < before and torch.isfinite(torch.tensor(temperature))):
        return 1.0, before, before
    return temperature, before, after


class TemperatureScaling(Posterior):
    """MAP LoRA with one temperature fitted on the validation split."""

    name = "temperature"
    Config = TemperatureConfig
    description = "MAP LoRA + temperature fitted by validation NLL, S=1"
    deterministic = True

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.map = MapAdapter(self)
        self.temperature = 1.0

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        if val is None or len(val) == 0:
            raise ConfigError("temperature scaling needs a validation split: set data.max_val > 0 in the suite")
        report = map_fit_report(self.map.fit(backbone, train, val))
        val_logits = map_predict(self.map, make_loader(val, self.config.train.eval_batch_size), self.name)
        self.temperature, before, after = fit_temperature(val_logits.logits[:, 0], val_logits.labels,
                                                          self.config.max_iter)
        report.posterior_params = 1
        report.extra.update({"temperature": self.temperature, "val_nll_map": before, "val_nll_scaled": after})
        return report

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        predictive = map_predict(self.map, loader, self.name)
        predictive.logits = predictive.logits / self.temperature
        return predictive

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.map.state(), "temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.map.restore(state["adapter"])
        self.temperature = float(state["temperature"])
