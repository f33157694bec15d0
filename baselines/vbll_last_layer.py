"""VBLL: a variational Bayesian last layer on cached features (docs/methods.md).

phi(x) comes from the MAP adapter (``features: map``, the cached MAP adapter of this seed) or the
frozen pretrained model (``features: base``). phi is computed once per training/validation example
(:mod:`bayeslora.features`); the head (:class:`baselines.vbll_head.VbllHead`, the ``vbll``
package's DiscClassification) trains on the cached features by the closed-form Jensen ELBO, once
per prior scale of ``prior_scale_grid``; the head with the lowest validation NLL is kept.
Prediction: one backbone pass per example, then S draws of the Gaussian logit predictive.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive, ResourceNeeds
from bayeslora.adapters import MapAdapter, map_fit_report
from bayeslora.backbone import Backbone, lora_parameter_count
from bayeslora.config import check_choice
from bayeslora.data import EncodedSplit
from bayeslora.features import (
    FeatureSet,
    adapter_context,
    cached_features,
    feature_batch,
    fitted_choice_mask,
    to_set_answers,
)
from bayeslora.predict import collect_predictive
from bayeslora.training import TrainResult, train

from .map_lora import AdapterConfig
from .vbll_head import VbllHead, VbllHeadHooks, VbllSettings

FEATURE_SOURCES = ("map", "base")


@dataclass
class VbllConfig(AdapterConfig):
    """``features``: map (the seed's MAP adapter, trained once and cached) or base (no adapter);
    ``vbll``: the head and its training (see :class:`VbllSettings`); ``prior_scale_grid``: prior
    scales to try, the one with the lowest validation NLL is kept (empty, or no validation split:
    ``vbll.prior_scale``). Heads train on cached features, so the grid costs seconds."""

    features: str = "map"
    """Features of the MAP adapter (map) or of the frozen model (base)."""
    vbll: VbllSettings = field(default_factory=VbllSettings)
    """The head and its training."""
    prior_scale_grid: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0, 30.0])
    """Prior scales tried; the lowest validation NLL wins (empty: vbll.prior_scale)."""


class VbllLastLayer(Posterior):
    """Variational Bayesian last layer over the K answer classes; one backbone pass, S head samples."""

    name = "vbll"
    Config = VbllConfig
    description = "VBLL head (vbll package, Jensen ELBO) on cached MAP-adapter features, one backbone pass"
    deterministic = False

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """The MAP adapter (trained or cached), then the head's mean and variance (2 K H) on cached
        features; one backbone pass per test example."""
        lora = lora_parameter_count(backbone, config.lora, num_classes)
        return ResourceNeeds(trainable=lora, stored=2 * num_classes * backbone.hidden_size, training_runs=2,
                             predict_passes=1)

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        check_choice("vbll features", self.config.features, FEATURE_SOURCES)
        self.map = MapAdapter(self) if self.config.features == "map" else None
        """The MAP adapter the features come from; None: the frozen model's features."""
        self.head: VbllHead | None = None
        self.prior_scale = self.config.vbll.prior_scale
        self.answer_ids: torch.Tensor | None = None

    @property
    def feature_adapter(self) -> str | None:
        return self.map.name if self.map is not None else None

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        report = map_fit_report(self.map.fit(backbone, train_split, val)) if self.map is not None else FitReport()
        batch_size = self.config.train.eval_batch_size
        train_features = cached_features(backbone, train_split, batch_size, self.feature_adapter, self.artifacts)
        val_loader = None
        if val is not None:
            val_features = cached_features(backbone, val, batch_size, self.feature_adapter, self.artifacts)
            val_loader = val_features.loader(batch_size)
        self.answer_ids = train_split.answer_ids.cpu()
        grid = self.config.prior_scale_grid if val_loader is not None and self.config.prior_scale_grid else []
        candidates = [dataclasses.replace(self.config.vbll, prior_scale=float(s)) for s in grid] or [self.config.vbll]
        fits = [self._train_head(backbone, train_features, val_loader, settings) for settings in candidates]
        best = min(range(len(fits)), key=lambda i: fits[i][1].best_val_nll)  # a single fit: index 0
        self.head, result = fits[best]
        self.prior_scale = candidates[best].prior_scale
        report.trainable_params += sum(p.numel() for p in self.head.parameters() if p.requires_grad)
        report.posterior_params = self.head.num_posterior_params()
        report.extra.update({"prior_scale": self.prior_scale, "head_steps": result.steps,
                             "head_val_nll": result.best_val_nll, "head_seconds": sum(r.seconds for _, r in fits)})
        return report

    def _train_head(self, backbone: Backbone, features: FeatureSet, val_loader: DataLoader | None,
                    settings: VbllSettings) -> tuple[VbllHead, TrainResult]:
        """A head trained by -ELBO on cached ``features`` (best validation state kept, if any)."""
        torch.manual_seed(self.seed)
        head = VbllHead.for_backbone(backbone, self.answer_ids, settings.weight_for(len(features)), settings)
        loader = features.loader(settings.head_train.batch_size, shuffle=True, seed=self.seed)
        result = train(VbllHeadHooks(head, seed=self.seed), loader, settings.head_train, backbone.device,
                       val_loader, desc=f"train {self.name} head")
        return head, result

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        generator = torch.Generator(backbone.device).manual_seed(self.seed)

        def sample(batch: dict[str, Any]) -> torch.Tensor:
            features = feature_batch(backbone, batch)["features"]
            mask = fitted_choice_mask(self.answer_ids, batch)
            samples = self.head.sample_logits(features, mask, num_samples, generator)
            return to_set_answers(samples, self.answer_ids, batch, features, backbone)

        with adapter_context(backbone, self.feature_adapter):
            return collect_predictive(backbone, loader, sample, desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        state = {"adapter": self.map.state()} if self.map is not None else {}
        return {**state, "head": self.head.state_dict(), "answer_ids": self.answer_ids,
                "prior_scale": self.prior_scale,
                "regularization_weight": self.head.layer.regularization_weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.map is not None:
            self.map.restore(state["adapter"])
        backbone = self.require_backbone()
        self.answer_ids = state["answer_ids"]
        self.prior_scale = state["prior_scale"]
        settings = dataclasses.replace(self.config.vbll, prior_scale=self.prior_scale)
        self.head = VbllHead.for_backbone(backbone, self.answer_ids, state["regularization_weight"], settings)
        self.head.load_state_dict(state["head"])
