"""Laplace-LoRA: a post-hoc Laplace posterior over the LoRA parameters of the MAP adapter
(METHODS.md section 4), computed by laplace-torch.

p(theta | D) ~= N(theta_MAP, (H + lambda I)^-1), H the GGN over all LoRA parameters (K-FAC by
default; diag or full where they fit), lambda tuned by the log marginal likelihood (default) or
validation NLL. Prediction is the linearised (GLM) predictive f ~ N(f(x; theta_MAP), J Sigma J^T):
the (N, S, K) output holds S logit samples of it, drawn by laplace-torch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from bayeslora import FitReport, Predictive
from bayeslora.backbone import Backbone
from bayeslora.data import EncodedSplit, make_loader
from bayeslora.predict import collect_predictive

from .laplace_common import (
    LaplacePosterior,
    LaplaceSettings,
    LogitsModel,
    build_laplace,
    check_memory,
    glm_logit_samples,
    tune_prior,
)
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

    def _laplace(self) -> Any:
        backbone = self.require_backbone()
        backbone.use_adapter(self.adapter_name)  # only this adapter's LoRA parameters require grad
        model = LogitsModel(backbone.lm, lambda b: backbone.head_logits(backbone.features(b), b, masked=False))
        return build_laplace(model, self.config)

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        start = time.perf_counter()
        report = super().fit(backbone, train, val)
        params = backbone.lora_parameters(self.adapter_name)
        factor_bytes = check_memory(params.values(), self.config, backbone.device)
        self.la = self._laplace()
        with eager_attention_if(backbone, self.config.hessian_structure == "full"):
            self.la.fit(make_loader(train, self.config.fit_batch_size))
        val_loader = make_loader(val, self.config.train.eval_batch_size) if val is not None else None
        tuned = tune_prior(self.la, self.config, val_loader)
        return self.finish_report(report, time.perf_counter() - start, params.values(), factor_bytes, tuned)

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        backbone.use_adapter(self.adapter_name)
        generator = torch.Generator(backbone.device).manual_seed(self.seed)
        return collect_predictive(
            backbone, loader,
            lambda b: glm_logit_samples(self.la, backbone.with_trunk_states(b), num_samples, generator),
            desc=self.name, inference_mode=False)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "laplace": self.la.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.la = self._laplace()
        self.la.load_state_dict(state["laplace"])
