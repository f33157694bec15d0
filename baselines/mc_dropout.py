"""MC dropout over the LoRA branch (docs/methods.md).

The MAP adapter (shared cache) predicts with its LoRA dropout left active: z_s(x) = z(x; theta, m_s)
with Bernoulli masks m_s ~ Bern(1 - p) on the LoRA input, S passes. Only the LoRA dropout modules
are switched to train mode; the frozen model stays in eval mode. Masks are drawn per row, so
``samples_per_forward`` > 1 stacks several samples into one batched forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive
from bayeslora.adapters import MapAdapter, map_fit_report
from bayeslora.backbone import Backbone
from bayeslora.config import Fraction, PositiveInt
from bayeslora.data import EncodedSplit
from bayeslora.predict import collect_predictive, sample_class_logits

from .map_lora import AdapterConfig


@dataclass
class McDropoutConfig(AdapterConfig):
    """``p``: test-time dropout rate (None: the adapter's training rate ``lora.dropout``);
    ``samples_per_forward``: samples stacked into one batched forward (memory for speed)."""

    p: Fraction | None = None
    """Test-time dropout rate (None: lora.dropout)."""
    samples_per_forward: PositiveInt = 1
    """Samples stacked into one batched forward."""


class McDropout(Posterior):
    """The MAP adapter with LoRA dropout active at test time; S stochastic passes."""

    name = "mc_dropout"
    Config = McDropoutConfig
    description = "MC dropout on the LoRA branch of the MAP adapter, S passes"

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.map = MapAdapter(self)

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        return map_fit_report(self.map.fit(backbone, train, val))

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.map.use()
        with backbone.lora_dropout_active(self.map.name, self.config.p):
            return collect_predictive(
                backbone, loader,
                lambda b: sample_class_logits(backbone, b, num_samples,
                                              samples_per_forward=self.config.samples_per_forward),
                desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.map.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.map.restore(state["adapter"])
