"""TFB: training-free Bayesianization of the MAP LoRA adapter (docs/methods.md).

For each adapted module, with the thin SVD of its B (d_out x r) = U diag(s) V^T, the adapter is rewritten
as B' = U diag(s), A' = V^T A (B'A' = BA, so at zero noise it is the MAP adapter). The posterior is a
Gaussian on A' alone,

    A'_s = A' + diag(sigma) E_s,   sigma_i = beta / s_i,   E_s ~ N(0, I)  (r x d_in),

so the noise of the weight update, B' diag(sigma) E_s = beta U E_s, is isotropic with scale beta in the
column space of B (directions with s_i = 0 carry no noise: B' ignores them). Nothing is trained: beta is
the largest value in [beta_min, beta_max] that keeps a validation criterion within ``tolerance`` of MAP's
(:func:`largest_within`, bisection with the same noise draws at every beta). The default criterion is the
authors' (Wang-ML-Lab/bayesian-peft, ``tfblora.py``): the NLL of MAP's own predicted classes (no labels
needed) may grow by at most ``tolerance`` relative to MAP's, ``|L(beta) - L(0)| / L(0) <= tolerance``;
``nll`` (absolute increase of the labelled NLL) and ``acc`` (drop in accuracy) are the options.
Prediction: S draws through the shared sampling path, one backbone pass each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from bayeslora import FitReport, Posterior, Predictive
from bayeslora.adapters import MapAdapter, map_fit_report
from bayeslora.backbone import Backbone
from bayeslora.config import NonNegativeFloat, PositiveFloat, PositiveInt
from bayeslora.data import EncodedSplit, make_loader
from bayeslora.errors import ConfigError
from bayeslora.metrics import classification_metrics, log_predictive
from bayeslora.predict import predict_with_weights

from .map_lora import AdapterConfig

SINGULAR_FLOOR = 1e-6
"""Singular values below this fraction of a module's largest get no noise (their B' column is zero)."""


@dataclass
class TfbConfig(AdapterConfig):
    """``metric``: what the search keeps within ``tolerance`` of MAP's on the validation split
    (pseudo_nll: relative change of the NLL of MAP's predicted classes, the authors'; nll: an increase of
    at most ``tolerance`` nats; acc: a drop of at most ``tolerance``); ``beta_min`` / ``beta_max``: the
    search range (the authors': 0.001 and 0.2); ``search_steps``: bisections; ``search_samples``: posterior
    draws per validation predictive during the search (the authors': 1)."""

    metric: Literal["pseudo_nll", "nll", "acc"] = "pseudo_nll"
    """The validation criterion the search keeps within tolerance of MAP's."""
    tolerance: NonNegativeFloat = 0.01
    """Allowed relative change (pseudo_nll), NLL increase in nats (nll) or accuracy drop (acc)."""
    beta_min: PositiveFloat = 1e-3
    """Smallest beta tried; if it fails, the posterior is MAP (beta = 0)."""
    beta_max: PositiveFloat = 0.2
    """Largest beta tried."""
    search_steps: PositiveInt = 10
    """Bisections of [beta_min, beta_max]."""
    search_samples: PositiveInt = 1
    """Draws per validation predictive during the search."""
    eval_batch_size: PositiveInt = 16
    """Validation batch size during the search."""

    def check(self) -> None:
        if self.beta_min >= self.beta_max:
            raise ConfigError(f"tfb: beta_min ({self.beta_min}) must be below beta_max ({self.beta_max})")


def largest_within(loss: Callable[[float], float], limit: float, low: float, high: float, steps: int) -> float:
    """The largest beta in [low, high] with loss(beta) <= limit, for loss non-decreasing in beta: ``high`` if
    it passes, 0 if even ``low`` fails, else ``steps`` bisections of [low, high] keeping the lower end
    feasible (its value is returned)."""
    if loss(high) <= limit:
        return high
    if loss(low) > limit:
        return 0.0
    for _ in range(steps):
        mid = (low + high) / 2
        if loss(mid) <= limit:
            low = mid
        else:
            high = mid
    return low


def factor_pairs(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module in an adapter state."""
    pairs = [(k, k.replace("lora_A", "lora_B")) for k in state if "lora_A" in k]
    missing = [b for _, b in pairs if b not in state]
    if missing:
        raise ValueError(f"adapter state has lora_A without lora_B: {missing[:3]}")
    return pairs


def svd_rewrite(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the state with B' = U diag(s), A' = V^T A for every module, {A key: s}) in float32."""
    rewritten, singular = dict(state), {}
    for a_key, b_key in factor_pairs(state):
        a, b = state[a_key].float(), state[b_key].float()
        u, s, vh = torch.linalg.svd(b, full_matrices=False)
        rewritten[b_key], rewritten[a_key], singular[a_key] = u * s, vh @ a, s
    return rewritten, singular


def row_std(singular: torch.Tensor, beta: float) -> torch.Tensor:
    """sigma_i = beta / s_i, and 0 where s_i is below :data:`SINGULAR_FLOOR` of the largest."""
    keep = singular > SINGULAR_FLOOR * singular.max().clamp(min=1e-30)
    return torch.where(keep, beta / singular.clamp(min=1e-30), torch.zeros_like(singular))


def draw_weights(rewritten: dict[str, torch.Tensor], singular: dict[str, torch.Tensor], beta: float,
                 num_samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """S weight sets: A'_s = A' + diag(beta / s) E_s per module, B' as is (CPU generator: the same draws on
    every device)."""
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(num_samples):
        weights = dict(rewritten)
        for a_key, s in singular.items():
            a = rewritten[a_key]
            noise = torch.randn(a.shape, generator=gen) * row_std(s, beta)[:, None]
            weights[a_key] = a + noise
        draws.append(weights)
    return draws


class Tfb(Posterior):
    """Training-free Bayesianization of the cached MAP adapter: beta by validation search, S passes."""

    name = "tfb"
    Config = TfbConfig
    description = "TFB: training-free Gaussian on the SVD-rotated MAP LoRA A (beta by validation search), S passes"

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.map = MapAdapter(self)
        self.beta = 0.0
        self.rewritten: dict[str, torch.Tensor] = {}
        self.singular: dict[str, torch.Tensor] = {}
        self.map_classes: torch.Tensor | None = None

    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        if val is None or len(val) == 0:
            raise ConfigError("tfb chooses beta on the validation split: give the dataset validation examples "
                              "(data.max_val > 0)")
        report = map_fit_report(self.map.fit(backbone, train, val))
        self.rewritten, self.singular = svd_rewrite(self.map.state())
        loader = make_loader(val, self.config.eval_batch_size)
        self.map_classes = None
        baseline = self.validation_loss(loader, 0.0)
        tol = self.config.tolerance
        limit = baseline * (1 + tol) if self.config.metric == "pseudo_nll" else baseline + tol
        self.beta = largest_within(lambda beta: self.validation_loss(loader, beta), limit,
                                   self.config.beta_min, self.config.beta_max, self.config.search_steps)
        report.posterior_params = 1
        report.extra.update({"beta": self.beta, "val_loss_map": baseline,
                             "val_loss_beta": self.validation_loss(loader, self.beta)})
        return report

    def validation_loss(self, loader: DataLoader, beta: float) -> float:
        """The search criterion at ``beta`` from the ``search_samples``-draw validation predictive: the NLL
        of MAP's predicted classes (pseudo_nll; MAP's are taken at beta = 0, called first), the NLL, or
        minus the accuracy. The same draws of E at every beta (common random numbers): deterministic in beta."""
        samples = 1 if beta == 0 else self.config.search_samples
        draws = draw_weights(self.rewritten, self.singular, beta, samples, self.seed + 1)
        pred = predict_with_weights(self.map.use(), self.map.name, draws, loader, f"{self.name} search")
        if self.config.metric == "pseudo_nll":
            if self.map_classes is None:
                self.map_classes = log_predictive(pred.logits).argmax(-1)
            return float(-log_predictive(pred.logits).gather(1, self.map_classes[:, None]).mean())
        metrics = classification_metrics(pred.logits, pred.labels)
        return metrics["nll"] if self.config.metric == "nll" else -metrics["acc"]

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        draws = draw_weights(self.rewritten, self.singular, self.beta, num_samples, self.seed)
        return predict_with_weights(self.map.use(), self.map.name, draws, loader, self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.map.state(), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.map.restore(state["adapter"])
        self.rewritten, self.singular = svd_rewrite(self.map.state())
        self.beta = float(state["beta"])
