"""Last-layer Laplace: laplace-torch on the K answer rows of the LM head only (docs/methods.md).

The MAP adapter's features phi(x) (last-position hidden state after the final norm) come from the
feature cache (:mod:`bayeslora.features`), computed once per example; the head z = W phi + b
(W: the K answer-token rows of the LM head, initialised at their pretrained values) gets
p(W | D) ~= N(W, (H + lambda I)^-1) with H the GGN of the CE loss (full by default: K x H
parameters), lambda by log marginal likelihood. Prediction runs the backbone
once per example and draws S logit samples of the GLM predictive f ~ N(W phi, J Sigma J^T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bayeslora.backbone import Backbone
from bayeslora.data import EncodedSplit
from bayeslora.features import cached_features, check_answer_ids, feature_batch

from .laplace_common import LaplacePosterior, LaplaceSettings, LogitsModel
from .map_lora import AdapterConfig


class AnswerHead(nn.Module):
    """z = W phi + b over the K answer rows, for batches {"features": (B, H), ...}; an nn.Linear, so
    every Hessian structure of laplace-torch (K-FAC included) applies."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias is not None:
                self.linear.bias.copy_(bias)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.linear(batch["features"].to(self.linear.weight.device))


@dataclass
class LastLayerLaplaceConfig(LaplaceSettings, AdapterConfig):
    """As Laplace-LoRA; the head is small, so the default Hessian is full."""

    hessian_structure: str = "full"
    """The head is small: the full Hessian by default."""


class LastLayerLaplace(LaplacePosterior):
    """Laplace over the answer rows of the LM head on top of the MAP adapter; one backbone pass, S samples."""

    name = "laplace_last_layer"
    dict_key_x = "features"
    Config = LastLayerLaplaceConfig
    description = "last-layer Laplace on the K answer rows (laplace-torch, GLM), one backbone pass, S samples"

    @classmethod
    def laplace_shapes(cls, backbone: Backbone, config: Any, num_classes: int) -> list[tuple[int, ...]]:
        """The K answer rows of the LM head, (K, H)."""
        return [(num_classes, backbone.hidden_size)]

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.head: AnswerHead | None = None
        self.answer_ids: torch.Tensor | None = None

    def _feature_loader(self, split: EncodedSplit) -> DataLoader:
        """Cached MAP-adapter features phi(x) of ``split``: the backbone runs once per example, ever."""
        features = cached_features(self.require_backbone(), split, self.config.train.eval_batch_size,
                                   self.map.name, self.artifacts)
        return features.loader(self.config.train.eval_batch_size)

    def laplace_model(self, train: EncodedSplit | None) -> nn.Module:
        """A fresh head on the answer rows of ``train`` (at fit), or on the rows saved with the state."""
        if train is not None:
            self.answer_ids = train.answer_ids.cpu()
            self.head = AnswerHead(*self.require_backbone().head_weight(self.answer_ids))
        return LogitsModel(self.head, self.head.forward)

    def curvature_loader(self, train: EncodedSplit) -> DataLoader:
        return self._feature_loader(train)

    def validation_loader(self, val: EncodedSplit) -> DataLoader:
        return self._feature_loader(val)

    def glm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        check_answer_ids(self.name, self.answer_ids, batch)
        return feature_batch(self.require_backbone(), batch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "head": self.head.state_dict(), "answer_ids": self.answer_ids}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.answer_ids = state["answer_ids"]
        self.head = AnswerHead(*self.require_backbone().head_weight(self.answer_ids))
        self.head.load_state_dict(state["head"])
        super().load_state_dict(state)
