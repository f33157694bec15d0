"""The fit/predict/save flow shared by posteriors whose noisy adapter is a forward-hook adapter.

Subclasses build the adapter (a :class:`~baselines.hooked_adapter.HookedAdapter` with a ``generator``
attribute and a ``mean_weights()`` context) and its training hooks, and say how one batch is scored;
this class trains it through the shared loop with every peft adapter disabled, predicts S seeded
forward passes (or ``num_samples = 0``: the mean weights) and saves/reloads the adapter's state.
Used by BLoB and ScalaBL (through :mod:`baselines.variational_training`) and Bayesian-LoRA
(:mod:`baselines.bayesian_lora`).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayeslora import Posterior, Predictive
from bayeslora.backbone import Backbone
from bayeslora.data import EncodedSplit
from bayeslora.predict import collect_predictive
from bayeslora.training import TrainingHooks, TrainResult, train_seeded

from .hooked_adapter import HookedAdapter


class HookedAdapterPosterior(Posterior):
    """Base class: implement :meth:`build_adapter`, :meth:`make_hooks` and :meth:`logits`."""

    adapts_lm_head = False
    answer_ids: torch.Tensor | None = None
    """The training set's answer tokens, set by fit (``train_adapter``) or :meth:`load_state_dict`: the rows of
    an adapter's answer-head part (``head_ids``), where it has one."""

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.adapter: Any = None
        self.train_result: TrainResult | None = None

    @abc.abstractmethod
    def build_adapter(self, backbone: Backbone) -> HookedAdapter:
        """A freshly initialised adapter (seeded by ``self.seed``)."""

    @abc.abstractmethod
    def make_hooks(self, backbone: Backbone, n_train: int, batches_per_epoch: int) -> TrainingHooks:
        """The training objective over ``self.adapter``'s parameters."""

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, K) answer logits with the adapter active (one noise draw)."""
        return self.require_backbone().class_logits(batch)

    def sample(self, batch: dict[str, Any], num_samples: int) -> torch.Tensor:
        """(B, S, K): S forward passes, each with fresh noise (one pass, S = 1, for deterministic methods)."""
        return torch.stack([self.logits(batch) for _ in range(1 if self.deterministic else num_samples)], dim=1)

    def _build(self, backbone: Backbone) -> None:
        self.adapter = self.build_adapter(backbone)
        backbone.check_above_trunk(self.name, min(self.adapter.layer_indices()))

    def train_adapter(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None) -> TrainResult:
        """Build the adapter and train it through the shared loop (noise from the global RNG, seeded)."""
        self.attach_for_training(backbone)
        self.answer_ids = train_split.answer_ids.detach().clone().cpu()
        self._build(backbone)
        settings = self.config.train
        self.adapter.generator = None
        with backbone.adapters_disabled(), self.adapter.active():
            self.train_result = train_seeded(lambda loader: self.make_hooks(backbone, len(train_split), len(loader)),
                                             train_split, val, settings, self.seed, backbone.device,
                                             desc=f"train {self.name}")
        return self.train_result

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        adapter = self.adapter
        adapter.generator = torch.Generator(backbone.device).manual_seed(self.seed)

        def sample(batch: dict[str, Any]) -> torch.Tensor:
            if num_samples == 0:
                with adapter.mean_weights():
                    return self.logits(batch)[:, None]
            return self.sample(batch, num_samples)

        try:
            with backbone.adapters_disabled(), adapter.active():
                return collect_predictive(backbone, loader, sample, desc=self.name)
        finally:
            adapter.generator = None

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.answer_ids = state["adapter"].get("head_ids")
        self._build(self.require_backbone())
        self.adapter.load_state_dict(state["adapter"])
