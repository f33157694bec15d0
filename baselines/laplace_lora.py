"""Laplace-LoRA: a post-hoc Laplace posterior over the LoRA parameters of the MAP adapter
(docs/methods.md), computed by laplace-torch.

p(theta | D) ~= N(theta_MAP, (H + lambda I)^-1), H the GGN over all LoRA parameters (K-FAC by
default; diag or full where they fit), lambda tuned by the log marginal likelihood (default) or
validation NLL. Prediction is the linearised (GLM) predictive f ~ N(f(x; theta_MAP), J Sigma J^T):
the (N, S, K) output holds S logit samples of it, drawn by laplace-torch (in antithetic pairs by
default, see :class:`~baselines.laplace_common.LaplaceSettings`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from bayeslora import ResourceNeeds
from bayeslora.backbone import HEAD_TARGET, Backbone, target_modules
from bayeslora.data import EncodedSplit, make_loader

from .laplace_common import LaplacePosterior, LaplaceSettings, LogitsModel, PreparedBatches
from .map_lora import AdapterConfig


@contextlib.contextmanager
def eager_attention_if(backbone: Backbone, needed: bool) -> Iterator[None]:
    """The full GGN needs forward-mode AD, which PyTorch's fused SDPA kernels lack: use eager attention."""
    previous = backbone.lm.config._attn_implementation
    if needed and previous != "eager":
        backbone.lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if needed and previous != "eager":
            backbone.lm.set_attn_implementation(previous)


@dataclass
class LaplaceLoraConfig(LaplaceSettings, AdapterConfig):
    """LoRA/training settings of the MAP adapter plus the Laplace settings."""


class LaplaceLora(LaplacePosterior):
    """Laplace over every LoRA parameter of the (cached) MAP adapter; GLM predictive, S samples."""

    name = "laplace_lora"
    Config = LaplaceLoraConfig
    description = "Laplace-LoRA (laplace-torch, K-FAC GGN, marglik prior, GLM predictive), S samples"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """Laplace's needs, plus what differentiating the backbone costs: K-FAC sums each batch's
        factors into the running ones (one more copy while fitting), and the curvature and GLM passes
        keep the graph of ``fit_batch_size`` / ``jacobian_batch_size`` examples."""
        needs = super().resource_needs(backbone, config, num_classes)
        one_copy = needs.stored // 2  # stored counts the factors twice (precision + decomposition)
        return replace(needs, fit_stored=one_copy, curvature_batch=config.fit_batch_size,
                       jacobian_batch=config.jacobian_batch_size)

    @classmethod
    def laplace_shapes(cls, backbone: Backbone, config: Any, num_classes: int) -> list[tuple[int, ...]]:
        """Every LoRA A (r x d_in) and B (d_out x r), and the lm_head LoRA's A (r x H) and B_K (K x r)."""
        r = config.lora.r
        head = [(r, backbone.hidden_size), (num_classes, r)] if HEAD_TARGET in config.lora.target_modules else []
        return head + [s for m in target_modules(backbone, config.lora).values()
                       for s in ((r, m.in_features), (m.out_features, r))]

    def laplace_model(self, train: EncodedSplit | None) -> nn.Module:
        backbone = self.require_backbone()
        return LogitsModel(backbone.lm, lambda b: backbone.head_logits(backbone.features(b), b, masked=False))

    def curvature_loader(self, train: EncodedSplit) -> DataLoader:
        return make_loader(train, self.config.fit_batch_size)

    def validation_loader(self, val: EncodedSplit) -> PreparedBatches:
        """For the validation-NLL grid search: the GLM predictive's inputs and Jacobian chunks."""
        return PreparedBatches(make_loader(val, self.config.train.eval_batch_size), self.glm_inputs,
                               self.config.jacobian_batch_size)

    def curvature_context(self) -> contextlib.AbstractContextManager[Any]:
        return eager_attention_if(self.require_backbone(), self.config.hessian_structure == "full")

    def glm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # laplace-torch's Jacobians run under torch.func, where the trunk cache cannot look entries up
        return self.require_backbone().with_trunk_states(batch)
