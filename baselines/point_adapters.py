"""Point-estimate baselines with adapters of their own: LoRA-XS and PoLAR trained by MAP (docs/methods.md).

The non-Bayesian counterparts the seed papers compare against, through the shared loop (mean CE):

- ``lora_xs``: LoRA-XS, dW = (alpha/r) B R A with B, A the frozen truncated SVD of W0 and only the
  r x r R trained (:mod:`baselines.lora_xs`); B-LoRA-XS is this plus SWAG over R.
- ``polar``: a PoLAR adapter, dW = (alpha/r) X Theta Y^T with X, Y kept near the Stiefel manifold by the
  landing field applied to their gradients before every step (:mod:`baselines.polar`); PoLAR-VBLL is
  this with a VBLL head.

Both predict deterministically (S = 1) with the LM head's answer rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bayeslora import FitReport, ResourceNeeds
from bayeslora.adapters import ClassifierHooks
from bayeslora.backbone import Backbone, target_modules
from bayeslora.config import AdapterConfig, PositiveFloat
from bayeslora.data import EncodedSplit

from .hooked_posterior import HookedAdapterPosterior
from .lora_xs import LoraXsAdapter, lora_xs_factors
from .polar import PolarAdapter


@dataclass
class LoraXsConfig(AdapterConfig):
    """``lora.r`` is the SVD rank and ``lora.alpha`` the scale alpha/r; ``lora.dropout`` is not used."""

    init_std: PositiveFloat = 1e-5
    """Std of R at init (LoRA-XS: 1e-5)."""


class LoraXs(HookedAdapterPosterior):
    """LoRA-XS: frozen SVD factors, the r x r R trained by MAP; one forward pass."""

    name = "lora_xs"
    deterministic = True
    supports_gradient_checkpointing = False
    Config = LoraXsConfig
    description = "LoRA-XS: SVD factors frozen, r x r R trained by MAP (B-LoRA-XS's point estimate)"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """r x r per module trained."""
        return ResourceNeeds(trainable=len(target_modules(backbone, config.lora)) * config.lora.r ** 2,
                             predict_passes=1)

    def build_adapter(self, backbone: Backbone) -> LoraXsAdapter:
        lora = self.config.lora
        factors = lora_xs_factors(backbone, lora, self.artifacts)
        return LoraXsAdapter(target_modules(backbone, lora), factors, lora.r, lora.alpha, seed=self.seed,
                             init_std=self.config.init_std)

    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> ClassifierHooks:
        return ClassifierHooks(backbone, dict(self.adapter.R.items()))

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        return FitReport(trainable_params=sum(p.numel() for p in self.adapter.R.values()), posterior_params=0,
                         train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds})


@dataclass
class PolarConfig(AdapterConfig):
    """``landing_strength``: lambda of the landing field; ``stiefel_lr``: rate of X and Y (None: train.lr)."""

    landing_strength: PositiveFloat = 1.0
    """lambda of the landing field that keeps X and Y orthonormal."""
    stiefel_lr: PositiveFloat | None = None
    """Learning rate of X and Y (None: train.lr)."""


class PolarHooks(ClassifierHooks):
    """Mean CE; X and Y at ``stiefel_lr`` without weight decay, their gradients replaced by the landing field."""

    def __init__(self, backbone: Backbone, adapter: PolarAdapter, config: PolarConfig):
        super().__init__(backbone, dict(adapter.named_parameters()))
        self.adapter, self.config = adapter, config

    def param_groups(self) -> list[dict[str, Any]]:
        stiefel_lr = self.config.stiefel_lr or self.config.train.lr
        return [{"params": self.adapter.stiefel_parameters(), "lr": stiefel_lr, "weight_decay": 0.0},
                {"params": list(self.adapter.Theta.values())}]

    def transform_gradients(self) -> None:
        self.adapter.apply_landing(self.config.landing_strength)


class Polar(HookedAdapterPosterior):
    """A PoLAR adapter trained by MAP (no VBLL head); one forward pass."""

    name = "polar"
    deterministic = True
    supports_gradient_checkpointing = False
    Config = PolarConfig
    description = "PoLAR adapter (X Theta Y^T, landing field) trained by MAP, no VBLL head"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """X (d_out x r), Theta (r x r) and Y (d_in x r) per module."""
        r = config.lora.r
        modules = target_modules(backbone, config.lora).values()
        return ResourceNeeds(trainable=sum(r * (m.in_features + m.out_features) + r * r for m in modules),
                             predict_passes=1)

    def build_adapter(self, backbone: Backbone) -> PolarAdapter:
        lora = self.config.lora
        return PolarAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed)

    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> PolarHooks:
        return PolarHooks(backbone, self.adapter, self.config)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        result = self.train_adapter(backbone, train_split, val)
        return FitReport(trainable_params=sum(p.numel() for p in self.adapter.parameters()), posterior_params=0,
                         train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "orthogonality_error": self.adapter.orthogonality_error()})
