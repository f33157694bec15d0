"""PoLAR-VBLL: a PoLAR adapter (landing field) trained with a VBLL head (docs/methods.md).

The adapter (:mod:`baselines.polar`, dW = (alpha/r) X Theta Y^T on ``lora.target_modules`` in
``lora.layers``; ``lora.dropout`` is not used) and the head (:class:`baselines.vbll_head.VbllHead`)
both maximise the head's Jensen ELBO on phi(x) from the adapted model. ``schedule``
[reconstructed, default alternate]: even steps update the adapter with q(W) fixed, odd steps update
the head with the features detached (computed without gradients); ``joint`` updates both every step.
Before each optimiser step the gradients of X and Y are replaced by the landing field, which keeps
them near-orthogonal; the final ||P^T P - I||_F is reported as ``fit_orthogonality_error``.
Prediction: one backbone pass per example (adapter active), then S draws of the head's predictive.

``lora_vbll`` (:class:`LoraVbll`) is the same with a plain LoRA adapter (dW = (alpha/r) B A, no landing
field), trained jointly with the head: the LoRA + VBLL baseline PoLAR-VBLL is compared with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayeslora import ConfigError, FitReport, Posterior, Predictive, ResourceNeeds
from bayeslora.backbone import Backbone, lora_parameter_count, target_modules
from bayeslora.config import check_choice
from bayeslora.data import EncodedSplit
from bayeslora.features import feature_batch, fitted_choice_mask, to_set_answers
from bayeslora.predict import collect_predictive
from bayeslora.training import TrainingHooks, TrainResult, train_seeded

from .hooked_adapter import HookedAdapter, LoraHookAdapter
from .map_lora import AdapterConfig
from .polar import PolarAdapter
from .vbll_head import VbllHead, VbllHeadHooks, VbllSettings

SCHEDULES = ("alternate", "joint")


@dataclass
class PolarVbllConfig(AdapterConfig):
    """``schedule``: alternate | joint; ``landing_strength``: lambda of the landing field;
    ``head_lr``: learning rate of the head, ``stiefel_lr`` of X and Y (None: ``train.lr``, which
    Theta always uses); ``vbll``: the head (its ``head_train`` settings are not used: the head
    trains inside the adapter's loop)."""

    schedule: str = "alternate"
    """alternate (adapter and head steps in turn) or joint."""
    landing_strength: float = 1.0
    """lambda of the landing field that keeps X and Y orthonormal."""
    head_lr: float = 1e-2
    """Learning rate of the VBLL head."""
    stiefel_lr: float | None = None
    """Learning rate of X and Y (None: train.lr)."""
    vbll: VbllSettings = field(default_factory=VbllSettings)
    """The head (its head_train is not used)."""

    def check(self) -> None:
        check_choice("polar_vbll schedule", self.schedule, SCHEDULES)
        if self.landing_strength <= 0:
            raise ConfigError(f"landing_strength must be positive, got {self.landing_strength}")
        self.vbll.check()


@dataclass
class LoraVbllConfig(PolarVbllConfig):
    """As PoLAR-VBLL's; the adapter is a plain LoRA, so ``landing_strength`` and ``stiefel_lr`` are not used,
    and both train every step (``schedule: joint``)."""

    schedule: str = "joint"
    """joint (adapter and head every step) or alternate."""


class PolarVbllHooks(TrainingHooks):
    """-ELBO of the head on the adapted model's features; landing field on X, Y before each step."""

    def __init__(self, backbone: Backbone, adapter: HookedAdapter, head: VbllHead, config: PolarVbllConfig,
                 seed: int):
        self.backbone, self.adapter, self.head, self.config = backbone, adapter, head, config
        self.head_hooks = VbllHeadHooks(head, seed=seed)

    def param_groups(self) -> list[dict[str, Any]]:
        """PoLAR's X and Y at ``stiefel_lr`` without weight decay, the adapter's other parameters (Theta; a
        plain LoRA's A and B) at train.lr, the head at ``head_lr``."""
        stiefel_lr = self.config.stiefel_lr if self.config.stiefel_lr is not None else self.config.train.lr
        stiefel = self.adapter.stiefel_parameters() if isinstance(self.adapter, PolarAdapter) else []
        rest = [p for p in self.adapter.parameters() if all(p is not q for q in stiefel)]
        groups = [{"params": stiefel, "lr": stiefel_lr, "weight_decay": 0.0}] if stiefel else []
        return groups + [{"params": rest},
                         {"params": list(self.head.parameters()), "lr": self.config.head_lr, "weight_decay": 0.0}]

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        joint = self.config.schedule == "joint"
        update_adapter, update_head = joint or step % 2 == 0, joint or step % 2 == 1
        for p in self.head.parameters():
            p.requires_grad_(update_head)
        with torch.set_grad_enabled(update_adapter):
            features = self.backbone.features(batch)
        return self.head.loss(features, batch["labels"], batch["choice_mask"])

    def transform_gradients(self) -> None:
        if isinstance(self.adapter, PolarAdapter):
            self.adapter.apply_landing(self.config.landing_strength)

    def val_nll(self, loader: DataLoader) -> float:
        return self.head_hooks.val_nll(feature_batch(self.backbone, b) for b in loader)

    def snapshot(self) -> dict[str, Any]:
        return {"adapter": copy.deepcopy(self.adapter.state_dict()), "head": self.head_hooks.snapshot()}

    def restore(self, state: dict[str, Any]) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.head_hooks.restore(state["head"])


class PolarVbll(Posterior):
    """PoLAR adapter + VBLL head; one backbone pass and S head samples per example."""

    name = "polar_vbll"
    adapts_lm_head = False  # its own PoLAR hooks on layer modules; the VBLL head is the head
    supports_gradient_checkpointing = False
    Config = PolarVbllConfig
    description = "PoLAR adapter (landing field) + VBLL head, alternating ELBO steps, one backbone pass"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """X (d_out x r), Theta (r x r), Y (d_in x r) per module and the head's 2 K H, trained together;
        one backbone pass per test example."""
        r = config.lora.r
        adapter = lora_parameter_count(backbone, config.lora) + r * r * len(target_modules(backbone, config.lora))
        return ResourceNeeds(trainable=adapter + 2 * num_classes * backbone.hidden_size, predict_passes=1)

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.adapter: HookedAdapter | None = None
        self.head: VbllHead | None = None
        self.answer_ids: torch.Tensor | None = None
        self.train_result: TrainResult | None = None

    def build_adapter(self, backbone: Backbone) -> HookedAdapter:
        lora = self.config.lora
        return PolarAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed)

    def _build(self, backbone: Backbone, answer_ids: torch.Tensor, regularization_weight: float) -> None:
        self.adapter = self.build_adapter(backbone)
        backbone.check_above_trunk(self.name, min(self.adapter.layer_indices()))
        self.answer_ids = answer_ids.cpu()
        self.head = VbllHead.for_backbone(backbone, self.answer_ids, regularization_weight, self.config.vbll)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        torch.manual_seed(self.seed)
        self._build(backbone, train_split.answer_ids, self.config.vbll.weight_for(len(train_split)))
        settings = self.config.train
        hooks = PolarVbllHooks(backbone, self.adapter, self.head, self.config, self.seed)
        with backbone.adapters_disabled(), self.adapter.active():
            result = self.train_result = train_seeded(lambda _: hooks, train_split, val, settings, self.seed,
                                                      backbone.device, desc=f"train {self.name}")
        for p in self.head.parameters():
            p.requires_grad_(True)
        n_adapter = sum(p.numel() for p in self.adapter.parameters())
        return FitReport(
            trainable_params=n_adapter + sum(p.numel() for p in self.head.parameters()),
            posterior_params=self.head.num_posterior_params(),
            train_steps=result.steps,
            extra={"adapter_params": n_adapter, "best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                   **({"orthogonality_error": self.adapter.orthogonality_error()}
                      if isinstance(self.adapter, PolarAdapter) else {})},
        )

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        generator = torch.Generator(backbone.device).manual_seed(self.seed)

        def sample(batch: dict[str, Any]) -> torch.Tensor:
            features = feature_batch(backbone, batch)["features"]
            mask = fitted_choice_mask(self.answer_ids, batch)
            samples = self.head.sample_logits(features, mask, num_samples, generator)
            return to_set_answers(samples, self.answer_ids, batch, features, backbone)

        with backbone.adapters_disabled(), self.adapter.active():
            return collect_predictive(backbone, loader, sample, desc=self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter.state_dict(), "head": self.head.state_dict(), "answer_ids": self.answer_ids,
                "regularization_weight": self.head.layer.regularization_weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build(self.require_backbone(), state["answer_ids"], state["regularization_weight"])
        self.adapter.load_state_dict(state["adapter"])
        self.head.load_state_dict(state["head"])


class LoraVbll(PolarVbll):
    """LoRA + VBLL head trained jointly on the head's ELBO (PoLAR-VBLL's baseline); one backbone pass."""

    name = "lora_vbll"
    description = "LoRA adapter + VBLL head trained jointly on the ELBO, one backbone pass, S head samples"
    Config = LoraVbllConfig

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """A and B per module and the head's 2 K H, trained together; one backbone pass per test example."""
        return ResourceNeeds(trainable=lora_parameter_count(backbone, config.lora)
                             + 2 * num_classes * backbone.hidden_size, predict_passes=1)

    def build_adapter(self, backbone: Backbone) -> HookedAdapter:
        lora = self.config.lora
        return LoraHookAdapter(target_modules(backbone, lora), lora.r, lora.alpha, seed=self.seed)
