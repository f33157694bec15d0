"""LoRA-Curve: a segmented Bezier curve phi(t) through LoRA space as the posterior (docs/methods.md, LoRA-Curve).

Training minimises, per minibatch, with m curve points t_1..t_m drawn uniformly (or stratified),

    L = (1/m) sum_j NLL(phi(t_j) + eps_j) - lambda_JS * JSD(p_t1, .., p_tm),
    JSD = H[(1/m) sum_j p_j] - (1/m) sum_j H[p_j],

where eps_j ~ N(0, s^2 I) is the optional flat-minima perturbation (s = sigma, or sigma times each
LoRA factor's root-mean-square value) and the Jensen-Shannon term rewards curve points that
disagree, which raises the predictive's mutual information. Prediction averages S curve points
(a uniform grid over [0, 1] by default), so S = num_samples forward passes.

``mode: anchored`` freezes M independently trained MAP adapters as the anchors (member i of seed s
is the cached MAP adapter of seed s*M + i, the same adapters as the ensemble of that seed) and trains
the interior control points, initialised on the straight lines between the anchors. ``mode: free``
trains all control points from independent LoRA initialisations.

[reconstructed] (no full text or code is public): the defaults n=2, M=3, m=2, lambda_JS=0.1,
sigma=0 (0.01 when on), the norm-relative perturbation scale per LoRA factor, the stratified
sampler (one t per 1/m of [0, 1]) and the grid with both endpoints for prediction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .adapters import fit_lora_adapter
from .artifacts import ArtifactStore
from .backbone import Backbone, answer_rows, lora_parameter_count
from .config import (
    AdapterConfig,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    TrainSettings,
    check_choice,
)
from .curve import BezierCurve, Weights, interpolate, num_control_points
from .data import EncodedSplit
from .errors import ConfigError
from .metrics import log_predictive
from .paths import WeightPath
from .posterior import FitReport, Posterior, ResourceNeeds
from .predict import predict_with_weights
from .predictive import Predictive
from .training import TrainingHooks, train_seeded

PREDICT_T_SEED_OFFSET, PREDICT_NOISE_SEED_OFFSET = 7919, 104729
"""Test-time draws (sampled t, perturbations) use their own generators, seeded from the run seed, so a
reloaded curve predicts exactly the same."""


@dataclass
class LoraCurveConfig(AdapterConfig):
    """LoRA-Curve settings (names follow docs/methods.md, LoRA-Curve).

    ``mode``: anchored | free. ``anchors``: M. ``degree``: n. ``t_per_step``: m curve points per
    minibatch, drawn by ``t_sampling`` (uniform | stratified). ``js_weight``: lambda_JS (0 = off).
    ``perturbation``: sigma (0 = off), scaled per ``perturbation_scale`` (absolute | weight_norm).
    ``predict_points``: grid | sampled; ``predict_perturbation`` adds eps at test time too.
    ``val_points``: curve points of the validation predictive used for early stopping.
    ``curve_lr`` / ``curve_epochs``: the curve stage's learning rate and epochs (None: ``train``'s), so
    the anchors stay the shared MAP adapters trained with ``train`` while the curve trains its own way.
    """

    mode: str = "anchored"
    """anchored (MAP adapters as fixed anchors) or free (every point trained)."""
    anchors: PositiveInt = 3
    """M, the number of anchors."""
    degree: PositiveInt = 2
    """n, the degree of each Bezier segment."""
    t_per_step: PositiveInt = 2
    """m, curve points per minibatch."""
    t_sampling: str = "uniform"
    """How the m points are drawn: uniform or stratified."""
    js_weight: NonNegativeFloat = 0.1
    """lambda_JS, the weight of the Jensen-Shannon term (0: off)."""
    perturbation: NonNegativeFloat = 0.0
    """sigma of the flat-minima noise on phi(t) (0: off)."""
    perturbation_scale: str = "weight_norm"
    """sigma is absolute or relative to each factor's RMS (weight_norm)."""
    predict_points: str = "grid"
    """The S prediction points: a grid over [0, 1] or sampled."""
    predict_perturbation: bool = False
    """Add the flat-minima noise at test time too."""
    val_points: PositiveInt = 5
    """Curve points of the validation predictive (early stopping)."""
    curve_lr: PositiveFloat | None = None
    """The curve stage's learning rate (None: train.lr)."""
    curve_epochs: PositiveFloat | None = None
    """The curve stage's epochs (None: train.epochs)."""

    def curve_train_settings(self) -> TrainSettings:
        changes = {"lr": self.curve_lr, "epochs": self.curve_epochs}
        return dataclasses.replace(self.train, **{k: v for k, v in changes.items() if v is not None})

    def check(self) -> None:
        check_choice("lora_curve mode", self.mode, ("anchored", "free"))
        check_choice("lora_curve t_sampling", self.t_sampling, ("uniform", "stratified"))
        check_choice("lora_curve perturbation_scale", self.perturbation_scale, ("absolute", "weight_norm"))
        check_choice("lora_curve predict_points", self.predict_points, ("grid", "sampled"))
        if self.anchors < 2 or self.degree < 1 or self.t_per_step < 1 or self.val_points < 1:
            raise ConfigError(f"lora_curve needs anchors >= 2, degree >= 1, t_per_step >= 1 and val_points >= 1; "
                              f"got anchors={self.anchors}, degree={self.degree}, t_per_step={self.t_per_step}, "
                              f"val_points={self.val_points}")
        if self.js_weight < 0 or self.perturbation < 0:
            raise ConfigError(f"lora_curve js_weight and perturbation must be >= 0, got {self.js_weight} and "
                              f"{self.perturbation}")
        if self.js_weight > 0 and self.t_per_step < 2:
            raise ConfigError("lora_curve js_weight > 0 needs t_per_step >= 2: the Jensen-Shannon divergence of "
                              "a single curve point is 0. Set t_per_step: 2 or js_weight: 0")


def jensen_shannon(logits: torch.Tensor) -> torch.Tensor:
    """JSD(p_1..p_m) = H[(1/m) sum_j p_j] - (1/m) sum_j H[p_j], per example, averaged over the batch.

    ``logits``: (m, B, K) class logits of m curve points (uniform weights); differentiable."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    entropy_of_mean = -(log_mean.exp() * log_mean).sum(-1)
    mean_entropy = -(log_p.exp() * log_p).sum(-1).mean(0)
    return (entropy_of_mean - mean_entropy).mean()


def perturb(weights: Weights, sigma: float, scale: str, generator: torch.Generator) -> Weights:
    """theta + eps with eps ~ N(0, s^2 I) per tensor: s = sigma (``absolute``) or
    s = sigma ||w||_F / sqrt(numel w) (``weight_norm``, relative to the factor's RMS value)."""
    out = {}
    for name, w in weights.items():
        noise = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        s = sigma if scale == "absolute" else sigma * w.detach().norm() / math.sqrt(w.numel())
        out[name] = w + s * noise
    return out


def curve_grid(points: int) -> list[float]:
    """``points`` equally spaced t in [0, 1], both ends included (t = 0.5 for a single point)."""
    return [0.5] if points == 1 else torch.linspace(0, 1, points).tolist()


class CurveHooks(TrainingHooks):
    """The curve objective in the shared training loop: m curve points per minibatch, JSD, perturbation."""

    def __init__(self, backbone: Backbone, adapter: str, curve: BezierCurve, config: LoraCurveConfig, seed: int):
        self.backbone, self.adapter, self.curve, self.config = backbone, adapter, curve, config
        self.t_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator(device=backbone.device).manual_seed(seed + 1)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.curve.trainable_parameters()}]

    def sample_t(self) -> list[float]:
        """m values of t: i.i.d. U(0, 1), or stratified (t_j ~ U(j/m, (j+1)/m))."""
        m = self.config.t_per_step
        u = torch.rand(m, generator=self.t_generator, dtype=torch.float64)
        if self.config.t_sampling == "stratified":
            u = (torch.arange(m, dtype=torch.float64) + u) / m
        return u.clamp(0.0, 1.0).tolist()

    def logits_at(self, batch: dict[str, Any], t: float, perturbed: bool) -> torch.Tensor:
        weights = self.curve.point(t)
        if perturbed and self.config.perturbation > 0:
            weights = perturb(weights, self.config.perturbation, self.config.perturbation_scale,
                              self.noise_generator)
        return self.backbone.class_logits_with(self.adapter, weights, batch)

    def step_context(self) -> AbstractContextManager[Any]:
        return self.backbone.training_mode()

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        times = self.sample_t()
        logits = torch.stack([self.logits_at(batch, t, perturbed=True) for t in times])
        labels = batch["labels"].to(logits.device)
        nll = torch.stack([F.cross_entropy(z, labels) for z in logits]).mean()
        if self.config.js_weight > 0:
            return nll - self.config.js_weight * jensen_shannon(logits)
        return nll

    def val_nll(self, loader: DataLoader) -> float:
        """NLL of the predictive averaged over ``val_points`` grid points of the curve."""
        total, n = 0.0, 0
        with torch.inference_mode():
            points = [self.curve.point(t) for t in curve_grid(self.config.val_points)]
            for batch in loader:
                logits = torch.stack([self.backbone.class_logits_with(self.adapter, w, batch) for w in points], 1)
                log_p = log_predictive(logits)
                total -= log_p.gather(1, batch["labels"].to(log_p.device)[:, None]).sum().item()
                n += len(batch["labels"])
        return total / max(1, n)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.curve.state_dict().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.curve.load_state_dict(state)


def segment_point(curve: BezierCurve, j: int) -> Callable[[float], Weights]:
    """tau -> phi on segment j: the curve at global t = (j + tau) / (M - 1)."""
    return lambda tau: curve.point((j + tau) / (curve.num_anchors - 1))


def straight_line(start: Weights, end: Weights) -> Callable[[float], Weights]:
    """t -> (1 - t) start + t end."""
    return lambda t: interpolate(start, end, t)


class LoraCurve(Posterior):
    """A trained Bezier curve of LoRA adapters; the predictive averages S points along it."""

    name = "lora_curve"
    supports_gradient_checkpointing = False
    Config = LoraCurveConfig
    description = "LoRA-Curve: segmented Bezier curve in LoRA space (anchored on MAP adapters or free), S points"
    saves_state: ClassVar[bool] = True

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """Anchored: M MAP anchors (trained or cached) held frozen while the (M-1)(n-1) interior control
        points train; free: all (M-1) n + 1 points train. Each point is one LoRA adapter."""
        lora = lora_parameter_count(backbone, config.lora, num_classes)
        points = num_control_points(config.anchors, config.degree)
        if config.mode == "anchored":
            return ResourceNeeds(trainable=(points - config.anchors) * lora, stored=config.anchors * lora,
                                 training_runs=config.anchors + 1)
        return ResourceNeeds(trainable=points * lora)

    def __init__(self, config: Any = None, *, seed: int = 0, artifacts: ArtifactStore | None = None):
        super().__init__(config, seed=seed, artifacts=artifacts)
        self.curve: BezierCurve | None = None

    def anchor_seeds(self) -> list[int]:
        """MAP seeds of the anchors: s*M .. s*M + M - 1 (the ensemble of seed s has the same members)."""
        m = self.config.anchors
        return [self.seed * m + i for i in range(m)]

    # ------------------------------------------------------------------ fit
    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        cfg = self.config
        if cfg.mode == "anchored":
            anchors, reused, anchor_steps = self._map_anchors(backbone, train_split, val)
            curve = BezierCurve.through_anchors(anchors, cfg.degree, train_anchors=False)
        else:
            points = [self._initial_point(backbone, k, len(train_split.answer_ids))
                      for k in range(num_control_points(cfg.anchors, cfg.degree))]
            curve = BezierCurve(points, cfg.anchors, cfg.degree, [True] * len(points))
            reused, anchor_steps = False, 0
        self.curve = curve.to(backbone.device)
        backbone.add_lora(self.adapter_name, cfg.lora, seed=self.seed, answer_ids=train_split.answer_ids)
        result = train_seeded(lambda _: CurveHooks(backbone, self.adapter_name, self.curve, cfg, self.seed),
                              train_split, val, cfg.curve_train_settings(), self.seed, backbone.device,
                              desc=f"train {self.adapter_name}")
        point_size = sum(w.numel() for w in self.curve.control_point(0).values())
        return FitReport(
            trainable_params=sum(p.numel() for p in self.curve.trainable_parameters()),
            posterior_params=(self.curve.num_points - 1) * point_size,
            train_steps=result.steps + anchor_steps,
            reused_cache=reused,
            extra={"curve_train_seconds": result.seconds, "curve_steps": result.steps,
                   "best_val_nll": result.best_val_nll, "control_points": self.curve.num_points},
        )

    def _map_anchors(self, backbone: Backbone, train_split: EncodedSplit,
                     val: EncodedSplit | None) -> tuple[list[Weights], bool, int]:
        """The M MAP adapters (trained once, cached, shared with MAP and the ensemble), frozen."""
        anchors, reused, steps = [], True, 0
        for s in self.anchor_seeds():
            name = self.owned_adapter(f"anchor{s}")
            fit = fit_lora_adapter(backbone, name, self.config.lora, self.config.train, train_split, val, s,
                                   self.artifacts)
            anchors.append(backbone.adapter_state(name))
            backbone.delete_adapter(name)
            reused, steps = reused and fit.reused, steps + (0 if fit.reused else fit.result.steps)
        return anchors, reused, steps

    def _initial_point(self, backbone: Backbone, k: int, num_classes: int) -> Weights:
        """An independent LoRA initialisation (peft's: A random, B = 0) for control point k."""
        name = self.owned_adapter(f"init{k}")
        backbone.add_lora(name, self.config.lora, seed=self.seed * 1000 + k, num_classes=num_classes)
        point = backbone.adapter_state(name)
        backbone.delete_adapter(name)
        return point

    # ------------------------------------------------------------------ predict
    def require_curve(self) -> BezierCurve:
        if self.curve is None:
            raise RuntimeError("LoraCurve has no curve: call fit(...) or load_state_dict(...) first")
        return self.curve

    def predict_times(self, num_samples: int) -> list[float]:
        """The S curve points: a uniform grid over [0, 1], or S sorted draws from U(0, 1) fixed by the seed."""
        if self.config.predict_points == "grid":
            return curve_grid(num_samples)
        generator = torch.Generator().manual_seed(self.seed + PREDICT_T_SEED_OFFSET)
        return torch.rand(num_samples, generator=generator, dtype=torch.float64).sort().values.tolist()

    def sample_weights(self, num_samples: int) -> list[Weights]:
        curve = self.require_curve()
        with torch.no_grad():
            points = [curve.point(t) for t in self.predict_times(num_samples)]
            if self.config.predict_perturbation and self.config.perturbation > 0:
                device = self.require_backbone().device
                generator = torch.Generator(device=device).manual_seed(self.seed + PREDICT_NOISE_SEED_OFFSET)
                points = [perturb(w, self.config.perturbation, self.config.perturbation_scale, generator)
                          for w in points]
        return points

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.require_backbone()
        return predict_with_weights(backbone, self.adapter_name, self.sample_weights(num_samples), loader, self.name)

    # ------------------------------------------------------------------ paths
    def paths(self) -> dict[str, WeightPath]:
        """Each curve segment ``curve_<j>-<j+1>`` (anchor j to anchor j + 1, t the segment's own parameter)
        next to the straight line between the same anchors ``line_<j>-<j+1>``, and the straight line
        ``line_<i>-<k>`` between every further pair of anchors."""
        curve = self.require_curve()
        m = curve.num_anchors
        paths: dict[str, WeightPath] = {}
        for j in range(m - 1):
            paths[f"curve_{j}-{j + 1}"] = WeightPath(self.adapter_name, segment_point(curve, j))
        for i in range(m):
            for k in range(i + 1, m):
                paths[f"line_{i}-{k}"] = WeightPath(self.adapter_name, straight_line(curve.anchor(i), curve.anchor(k)))
        return paths

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        curve = self.require_curve()
        return {"points": [{k: v.cpu() for k, v in p.items()} for p in curve.values()],
                "trainable": list(curve.trainable), "anchors": curve.num_anchors, "degree": curve.degree}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backbone = self.require_backbone()
        curve = BezierCurve(state["points"], state["anchors"], state["degree"], state["trainable"])
        self.curve = curve.to(backbone.device)
        backbone.ensure_adapter(self.adapter_name, self.config.lora, seed=self.seed,
                                num_classes=answer_rows(state["points"][0]))
