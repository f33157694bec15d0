"""A variational Bayesian last layer (the ``vbll`` package) as the K-way answer head.

q(W) = prod_k N(m_k, Sigma_k) over the rows of W (K x H); Sigma_k dense, diagonal or low-rank.
The logit predictive is Gaussian per class (vbll's ``logit_predictive``):
    z_k | phi ~ N(m_k^T phi, phi^T Sigma_k phi + sigma_k^2),   sigma^2: a learned logit-noise variance.
Training maximises vbll's closed-form Jensen ELBO (discriminative classification):
    ELBO = mean_i [ mu_{y_i}(phi_i) - logsumexp_k(mu_k(phi_i) + v_k(phi_i)/2) ]
           + w (log Wishart(noise) - KL(q(W) || N(0, s I))),   w = 1/N by default,
with options an example lacks left out of the logsumexp. The KL, the Wishart term and the logit
predictive are vbll's own; only the option mask around its bound is added here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import vbll
from torch import nn
from torch.utils.data import DataLoader
from vbll.layers.classification import gaussian_kl

from bayeslora import ConfigError
from bayeslora.backbone import Backbone, mask_choices
from bayeslora.config import TrainSettings, Validated, check_choice
from bayeslora.predictive import MASKED_LOGIT
from bayeslora.training import TrainingHooks

PARAMETERIZATIONS = ("dense", "diagonal", "lowrank")
INITS = ("answer_rows", "random")


def head_train_defaults() -> TrainSettings:
    """Head-only training on cached features: cheap, so many epochs; float32 (no autocast)."""
    return TrainSettings(epochs=20, lr=1e-2, batch_size=32, weight_decay=0.0, warmup_ratio=0.0,
                         schedule="cosine", autocast="off", progress=False)


@dataclass
class VbllSettings(Validated):
    """The head: ``parameterization`` of Sigma_k (dense | diagonal | lowrank with ``cov_rank``),
    prior N(0, ``prior_scale`` * 2/H I), Wishart(``wishart_scale``, ``dof``) on the logit noise,
    ``regularization_weight`` w (None: 1/N, N = training examples) and ``init`` of the mean: the
    pretrained LM-head rows of the answer tokens (answer_rows: the head starts at the zero-shot
    classifier) or vbll's random Kaiming init (random).

    Defaults (diagonal, prior_scale 10, head lr 1e-2 for 20 epochs) come from a validation sweep on
    SmolLM2-135M SST-2 features; the sweep and its reasons are in benchmarks/RESULTS.md."""

    parameterization: str = "diagonal"
    """Covariance of each class's weights: diagonal, dense or lowrank."""
    cov_rank: int = 3
    """Rank of the lowrank covariance."""
    prior_scale: float = 10.0
    """Prior N(0, prior_scale * 2/H I) on the head's weights."""
    wishart_scale: float = 1.0
    """Scale of the Wishart prior on the logit noise."""
    dof: float = 1.0
    """Degrees of freedom of the Wishart prior."""
    regularization_weight: float | None = None
    """The ELBO's regulariser weight w (None: 1/N)."""
    init: str = "answer_rows"
    """Mean's start: answer_rows (the LM-head rows) or random (vbll's init)."""
    head_train: TrainSettings = field(default_factory=head_train_defaults)
    """The head's own training settings."""

    def weight_for(self, num_train: int) -> float:
        """The ELBO's regulariser weight w: ``regularization_weight``, or 1/N."""
        return 1.0 / num_train if self.regularization_weight is None else self.regularization_weight

    def check(self) -> None:
        check_choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        check_choice("init", self.init, INITS)


class VbllHead(nn.Module):
    """vbll.DiscClassification over phi (B, H) -> K answer classes, with option masks."""

    def __init__(self, hidden: int, num_classes: int, regularization_weight: float, settings: VbllSettings):
        super().__init__()
        settings.check()
        self.layer = vbll.DiscClassification(
            hidden, num_classes, regularization_weight=regularization_weight,
            parameterization=settings.parameterization, prior_scale=settings.prior_scale,
            wishart_scale=settings.wishart_scale, dof=settings.dof, cov_rank=settings.cov_rank)

    @classmethod
    def for_backbone(cls, backbone: Backbone, answer_ids: torch.Tensor, regularization_weight: float,
                     settings: VbllSettings) -> VbllHead:
        """A head for ``backbone``'s features; with init answer_rows, m_k = the LM-head row of answer k."""
        head = cls(backbone.hidden_size, len(answer_ids), regularization_weight, settings)
        if settings.init == "answer_rows":
            weight, bias = backbone.head_weight(answer_ids)
            if bias is not None:
                raise ConfigError("vbll init: answer_rows needs an LM head without bias (VBLL has none); "
                                  "use init: random")
            with torch.no_grad():
                head.layer.W_mean.copy_(weight)
        return head.to(backbone.device)

    def logit_predictive(self, features: torch.Tensor) -> Any:
        """vbll's Gaussian over the K logits: ``.mean`` and ``.covariance_diagonal`` (B, K), in float32
        even under autocast (Cholesky factors and log-determinants need it)."""
        features = features.to(self.layer.W_mean.device, self.layer.W_mean.dtype)
        with torch.autocast(features.device.type, enabled=False):
            return self.layer.logit_predictive(features)

    def expected_log_likelihood(self, features: torch.Tensor, labels: torch.Tensor,
                                choice_mask: torch.Tensor) -> torch.Tensor:
        """Jensen bound per example: mu_y - logsumexp_k(mu_k + v_k/2) over the options present."""
        pred = self.logit_predictive(features)
        mask = choice_mask.to(pred.mean.device)
        mean = torch.where(mask, pred.mean, pred.mean + MASKED_LOGIT)
        variance = torch.where(mask, pred.covariance_diagonal, torch.zeros_like(pred.mean))
        labels = labels.to(mean.device)
        return mean.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(mean + 0.5 * variance, dim=-1)

    def regularizer(self) -> torch.Tensor:
        """w (log Wishart(noise) - KL(q(W) || prior)), as in vbll's training loss."""
        layer = self.layer
        noise = layer.noise()
        wishart = layer.dof * noise.logdet_precision - 0.5 * layer.wishart_scale * noise.trace_precision
        return layer.regularization_weight * (wishart - gaussian_kl(layer.W(), layer.prior_scale))

    def loss(self, features: torch.Tensor, labels: torch.Tensor, choice_mask: torch.Tensor) -> torch.Tensor:
        """-ELBO (minibatch estimate), in float32 even under autocast."""
        with torch.autocast(self.layer.W_mean.device.type, enabled=False):
            return -(self.expected_log_likelihood(features, labels, choice_mask).mean() + self.regularizer())

    def sample_logits(self, features: torch.Tensor, choice_mask: torch.Tensor, num_samples: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, S, K) draws z_s ~ N(mu(phi), diag v(phi)) of the logit predictive; absent options masked."""
        pred = self.logit_predictive(features)
        mean, std = pred.mean.detach(), pred.covariance_diagonal.detach().sqrt()
        noise = torch.randn((mean.shape[0], num_samples, mean.shape[1]), generator=generator,
                            device=mean.device, dtype=mean.dtype)
        samples = mean[:, None] + std[:, None] * noise
        return mask_choices(samples, choice_mask.to(samples.device)[:, None])

    def num_posterior_params(self) -> int:
        return sum(p.numel() for n, p in self.layer.named_parameters() if n.startswith("W_"))


def predictive_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-sum_i log mean_s softmax(z_is)_{y_i} for (B, S, K) logit samples (log-mean-exp)."""
    log_probs = torch.log_softmax(logits.double(), -1)
    log_mean = torch.logsumexp(log_probs, dim=1) - math.log(logits.shape[1])
    return -log_mean.gather(1, labels.to(log_mean.device)[:, None]).sum()


class VbllHeadHooks(TrainingHooks):
    """Trains a :class:`VbllHead` on feature batches {"features", "labels", "choice_mask"} by -ELBO;
    early stopping on the validation NLL of ``val_samples`` fixed-seed predictive samples."""

    def __init__(self, head: VbllHead, val_samples: int = 64, seed: int = 0):
        self.head = head
        self.val_samples = val_samples
        self.seed = seed

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.head.parameters() if p.requires_grad]}]

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        return self.head.loss(batch["features"], batch["labels"], batch["choice_mask"])

    def val_nll(self, loader: DataLoader) -> float:
        generator = torch.Generator(self.head.layer.W_mean.device).manual_seed(self.seed)
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                logits = self.head.sample_logits(batch["features"], batch["choice_mask"], self.val_samples, generator)
                total += float(predictive_nll(logits, batch["labels"]))
                n += len(batch["labels"])
        return total / max(1, n)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.head.state_dict())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)
