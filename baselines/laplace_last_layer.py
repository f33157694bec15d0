"""Last-layer Laplace: laplace-torch on the K answer rows of the LM head, at their MAP (docs/methods.md).

The MAP adapter's features phi(x) (last-position hidden state after the final norm) come from the
feature cache (:mod:`bayeslora.features`), computed once per example. The head is

    z = (W_K + D) phi + b,

W_K the pretrained answer rows and b their bias (fixed), D (K x H) the parameters the posterior is
over, with prior N(0, lambda^-1 I): centred on the pretrained head, as laplace-torch's zero-mean prior
then means. D starts at the MAP adapter's lm_head LoRA update (alpha/r) B_K A when the adapter has one
(0 otherwise) and is fitted to the MAP of the regularised training loss

    L(D) = sum_n CE(z_n, y_n) + (lambda/2) ||D||^2

by L-BFGS on the cached features (a convex problem: the gradient at the centre is ~0, reported as
``fit_centre_grad_norm``). p(D | data) ~= N(D*, (H + lambda I)^-1), H the GGN (full by default),
lambda by log marginal likelihood; centre, curvature and lambda are refitted until lambda moves by
less than 1% (``centre_rounds``). Prediction runs the backbone once per example and draws S logit
samples of the GLM predictive f ~ N(z(D*), J Sigma J^T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bayeslora.backbone import Backbone
from bayeslora.data import EncodedSplit
from bayeslora.features import cached_features, feature_batch, fitted_choice_mask, to_set_answers
from bayeslora.predictive import MASKED_LOGIT

from .laplace_common import LaplacePosterior, LaplaceSettings, LogitsModel
from .map_lora import AdapterConfig


class AnswerHead(nn.Module):
    """z = (W_K + D) phi + b for batches {"features": (B, H), ...}: W_K and b fixed buffers, D an nn.Linear
    without bias (so every Hessian structure of laplace-torch, K-FAC included, applies)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, delta: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("base_weight", weight.detach().clone())
        self.register_buffer("base_bias", None if bias is None else bias.detach().clone())
        self.delta = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                               dtype=weight.dtype)
        with torch.no_grad():
            self.delta.weight.copy_(torch.zeros_like(weight) if delta is None else delta)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = features @ self.base_weight.T + self.delta(features)
        return z if self.base_bias is None else z + self.base_bias

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.logits(batch["features"].to(self.base_weight.device))


def regularised_loss(head: AnswerHead, features: torch.Tensor, labels: torch.Tensor, prior_precision: float,
                     choice_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L(D) = sum_n CE(z_n, y_n) + (lambda/2) ||D||^2: the negative log joint laplace-torch's posterior is of
    (options an example lacks shifted by MASKED_LOGIT, as :class:`LogitsModel` does)."""
    z = head.logits(features)
    if choice_mask is not None:
        z = torch.where(choice_mask, z, z + MASKED_LOGIT)
    nll = F.cross_entropy(z, labels, reduction="sum")
    return nll + 0.5 * prior_precision * head.delta.weight.pow(2).sum()


def fit_head_map(head: AnswerHead, features: torch.Tensor, labels: torch.Tensor, prior_precision: float,
                 choice_mask: torch.Tensor | None = None, max_iter: int = 500) -> float:
    """D <- argmin L(D) by full-batch L-BFGS (strong Wolfe) in float64; returns ||grad L|| (float64) at the
    result as stored in the head's dtype."""
    dtype = head.delta.weight.dtype
    head.double()
    x = features.double()
    weight = head.delta.weight
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = regularised_loss(head, x, labels, prior_precision, choice_mask)
        loss.backward()
        return loss

    try:
        with torch.enable_grad():
            for _ in range(4):  # L-BFGS restarts: each call stops at max_iter or a stalled line search
                optimizer.step(closure)
            optimizer.zero_grad()
            head.to(dtype).double()  # the centre as stored, its gradient in float64
            loss = regularised_loss(head, x, labels, prior_precision, choice_mask)
            (grad,) = torch.autograd.grad(loss, head.delta.weight)
    finally:
        head.to(dtype)
    return float(grad.norm())


def head_lora_delta(backbone: Backbone) -> torch.Tensor | None:
    """(alpha/r) B_K A of the active adapter's lm_head LoRA (K x H), or None without one."""
    head = backbone.answer_lora
    name = head.active
    if name is None or name not in head.lora_A:
        return None
    with torch.no_grad():
        return head.scaling[name] * head.lora_B[name].weight.float() @ head.lora_A[name].weight.float()


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
        """A fresh head on the answer rows of ``train`` (at fit; D from the MAP adapter's lm_head LoRA, if
        any), or on the rows saved with the state."""
        if train is not None:
            self.answer_ids = train.answer_ids.cpu()
            backbone = self.require_backbone()
            self.head = AnswerHead(*backbone.head_weight(self.answer_ids), delta=head_lora_delta(backbone))
        return LogitsModel(self.head, self.head.forward)

    def fit_centre(self, train: EncodedSplit, prior_precision: float) -> dict[str, float]:
        """D at the MAP of the regularised loss on the cached training features (the posterior's centre)."""
        batches = list(self._feature_loader(train))
        device = self.head.base_weight.device
        x, y, mask = (torch.cat([b[k] for b in batches]).to(device) for k in ("features", "labels", "choice_mask"))
        with torch.no_grad():
            start = float(regularised_loss(self.head, x, y, prior_precision, mask))
        grad_norm = fit_head_map(self.head, x, y, prior_precision, mask)
        with torch.no_grad():
            end = float(regularised_loss(self.head, x, y, prior_precision, mask))
        return {"centre_loss_start": start, "centre_loss": end, "centre_grad_norm": grad_norm,
                "centre_delta_norm": float(self.head.delta.weight.norm())}

    def curvature_loader(self, train: EncodedSplit) -> DataLoader:
        return self._feature_loader(train)

    def validation_loader(self, val: EncodedSplit) -> DataLoader:
        return self._feature_loader(val)

    def glm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        inputs = feature_batch(self.require_backbone(), batch)
        return {**inputs, "choice_mask": fitted_choice_mask(self.answer_ids, batch)}

    def set_samples(self, batch: dict[str, Any], inputs: dict[str, Any], samples: torch.Tensor) -> torch.Tensor:
        """Another set's answers: the head's columns for the tokens it was fitted on, the LM head's logit for
        the others (:func:`bayeslora.features.to_set_answers`)."""
        return to_set_answers(samples, self.answer_ids, batch, inputs["features"], self.require_backbone())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "head": self.head.state_dict(), "answer_ids": self.answer_ids}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.answer_ids = state["answer_ids"]
        self.head = AnswerHead(*self.require_backbone().head_weight(self.answer_ids))
        self.head.load_state_dict(state["head"])
        super().load_state_dict(state)
