"""Deep ensemble of independently trained LoRA adapters on one backbone (docs/methods.md).

p(y|x) = 1/M sum_m softmax(z(x; theta_m)), each theta_m a MAP adapter trained from its own seed
(its own LoRA initialisation and data order). Member m of ensemble seed s is the MAP adapter of
seed s*M + m, so ensemble seed 0 reuses the cached MAP adapters of seeds 0..M-1 without retraining,
and different ensemble seeds never share members. One backbone in memory; the adapters are switched
per sample. Predictive samples are the members: S = M whatever ``num_samples`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from bayeslora import ConfigError, FitReport, Posterior, Predictive, ResourceNeeds
from bayeslora.adapters import MapAdapter
from bayeslora.backbone import Backbone, lora_parameter_count
from bayeslora.config import PositiveInt
from bayeslora.data import EncodedSplit
from bayeslora.predict import collect_predictive, sample_class_logits

from .map_lora import AdapterConfig


@dataclass
class EnsembleConfig(AdapterConfig):
    """``members``: M, the number of independently trained adapters (papers use 3-5)."""

    members: PositiveInt = 5
    """M, the number of independently trained adapters."""


class DeepEnsemble(Posterior):
    """M MAP adapters from seeds s*M .. s*M+M-1; the predictive averages their softmaxes."""

    name = "ensemble"
    Config = EnsembleConfig
    description = "deep ensemble of M MAP LoRA adapters (cached MAP seeds reused), S=M"
    deterministic = False

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """M adapters trained one after another (or reused from the MAP cache), all M held to predict."""
        lora = lora_parameter_count(backbone, config.lora, num_classes)
        return ResourceNeeds(trainable=lora, stored=(config.members - 1) * lora, training_runs=config.members,
                             predict_passes=config.members)

    def member_seeds(self) -> list[int]:
        if self.config.members < 1:
            raise ConfigError(f"ensemble members must be >= 1, got {self.config.members}")
        m = self.config.members
        return [self.seed * m + i for i in range(m)]

    def member_name(self, member_seed: int) -> str:
        return self.owned_adapter(f"member{member_seed}")

    def members(self) -> list[MapAdapter]:
        """Member m is the MAP adapter of seed s*M + m, held under this ensemble's name."""
        return [MapAdapter(self, name=self.member_name(s), seed=s) for s in self.member_seeds()]

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        fits = [member.fit(backbone, train, val) for member in self.members()]
        return FitReport(
            trainable_params=sum(f.trainable_params for f in fits),
            posterior_params=sum(f.trainable_params for f in fits[1:]),
            train_steps=sum(f.result.steps for f in fits),
            reused_cache=all(f.reused for f in fits),
            extra={"members": len(fits), "members_reused": sum(f.reused for f in fits)},
        )

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        names = [m.name for m in self.members()]

        def member(s: int) -> Any:
            return backbone.using_adapter(names[s])

        return collect_predictive(backbone, loader, lambda b: sample_class_logits(backbone, b, len(names), member),
                                  desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"members": {m.seed: m.state() for m in self.members()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        by_seed = {m.seed: m for m in self.members()}
        for s, adapter in state["members"].items():
            by_seed[int(s)].restore(adapter)
