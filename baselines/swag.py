"""SWAG (Maddox et al., 2019) over a flat parameter vector: the statistics and their Gaussian.

From snapshots theta_1..theta_n collected along an SGD trajectory at a constant (SWA) learning rate:

    mean      theta_bar = (1/n) sum_i theta_i                      (the SWA solution)
    diagonal  sigma^2   = (1/n) sum_i theta_i^2 - theta_bar^2       (clamped at ``var_clamp``)
    low rank  D         = the last K deviations theta_i - theta_bar_i (rows; theta_bar_i the mean after i)

and a sample is

    theta = theta_bar + sqrt(s) (sigma * z1 + D^T z2 / sqrt(K - 1)),   z1 ~ N(0, I_d), z2 ~ N(0, I_K),

i.e. theta ~ N(theta_bar, s (diag(sigma^2) + D^T D / (K - 1))). ``covariance: diagonal`` drops the
low-rank term (SWAG-diag); with fewer than 2 deviations the low-rank term is dropped as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from bayeslora import ConfigError
from bayeslora.config import Validated, check_choice

COVARIANCES = ("low_rank", "diagonal")


@dataclass
class SwagSettings(Validated):
    """The SWA phase and the SWAG Gaussian.

    ``epochs``: length of the SWA phase (after the burn-in); ``lr``: its constant learning rate
    (None: ``train.lr``); ``collect``: ``epoch`` takes one snapshot at the end of every epoch of the
    phase (the SWAG-LoRA and B-LoRA-XS code), ``steps`` one every ``collect_every`` optimiser steps (None:
    K + 1 snapshots spread evenly over the phase, for budgets shorter than K + 1 epochs);
    ``max_rank``: K, the number of deviations kept; ``scale``: s; ``covariance``: low_rank | diagonal."""

    epochs: float = 1.0
    """Length of the SWA phase after the burn-in, in epochs."""
    lr: float | None = None
    """The SWA phase's constant learning rate (None: train.lr)."""
    collect: Literal["steps", "epoch"] = "steps"
    """epoch: a snapshot at the end of every epoch of the phase (the reference code); steps: every
    collect_every optimiser steps."""
    collect_every: int | None = None
    """With collect: steps, optimiser steps between snapshots (None: K + 1 spread over the phase)."""
    max_rank: int = 10
    """K, the number of deviations kept."""
    scale: float = 0.5
    """s, the covariance scale of the samples."""
    covariance: str = "low_rank"
    """low_rank (SWAG) or diagonal (SWAG-diag)."""
    var_clamp: float = 1e-30
    """Floor of the diagonal variance."""

    def check(self) -> None:
        check_choice("swag covariance", self.covariance, COVARIANCES)
        if self.epochs <= 0 or (self.collect_every is not None and self.collect_every < 1) or self.max_rank < 1:
            raise ConfigError(f"swag.epochs must be > 0 and swag.collect_every, swag.max_rank >= 1; got "
                              f"{self.epochs}, {self.collect_every}, {self.max_rank}")
        if self.scale < 0:
            raise ConfigError(f"swag.scale must be >= 0, got {self.scale}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"swag.lr must be positive, got {self.lr}")

    def interval(self, total_steps: int) -> int:
        """Steps between snapshots: ``collect_every``, or total // (K + 1) (at least 1)."""
        if self.collect_every is not None:
            return self.collect_every
        return max(1, total_steps // (self.max_rank + 1))


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One float32 CPU vector of the tensors, in sorted key order."""
    return torch.cat([tensors[k].detach().reshape(-1).float().cpu() for k in sorted(tensors)])


def unflatten(vector: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten`: tensors shaped, typed and placed like ``like``."""
    total = sum(t.numel() for t in like.values())
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} entries, the tensors {total}")
    out, offset = {}, 0
    for key in sorted(like):
        ref = like[key]
        out[key] = vector[offset:offset + ref.numel()].view(ref.shape).to(ref.device, ref.dtype)
        offset += ref.numel()
    return out


class SwagStatistics:
    """Running first and second moments and the last K deviations of collected vectors."""

    def __init__(self, dim: int, max_rank: int = 10, var_clamp: float = 1e-30):
        self.dim, self.max_rank, self.var_clamp = dim, max_rank, var_clamp
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.sq_mean = torch.zeros(dim, dtype=torch.float64)
        self.deviations = torch.zeros(0, dim, dtype=torch.float32)

    def collect(self, theta: torch.Tensor) -> None:
        """Add one snapshot: update both moments, then append theta - mean (the updated mean)."""
        if theta.shape != (self.dim,):
            raise ValueError(f"SWAG snapshot must have shape ({self.dim},), got {tuple(theta.shape)}")
        theta = theta.detach().double().cpu()
        self.n += 1
        self.mean += (theta - self.mean) / self.n
        self.sq_mean += (theta**2 - self.sq_mean) / self.n
        deviation = (theta - self.mean).float()[None]
        self.deviations = torch.cat([self.deviations, deviation])[-self.max_rank:]

    @property
    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean**2).clamp(min=self.var_clamp)

    @property
    def rank(self) -> int:
        return self.deviations.shape[0]

    def uses_low_rank(self, covariance: str) -> bool:
        return covariance == "low_rank" and self.rank >= 2

    def sample(self, scale: float, generator: torch.Generator, covariance: str = "low_rank") -> torch.Tensor:
        """theta = mean + sqrt(s) (sigma z1 + D^T z2 / sqrt(K - 1)), float32."""
        if self.n == 0:
            raise RuntimeError("SWAG has no snapshots: the SWA phase collected none (lower swag.collect_every)")
        z1 = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        draw = self.variance.sqrt() * z1
        if self.uses_low_rank(covariance):
            z2 = torch.randn(self.rank, generator=generator, dtype=torch.float64)
            draw = draw + self.deviations.double().T @ z2 / (self.rank - 1) ** 0.5
        return (self.mean + scale**0.5 * draw).float()

    def covariance_matrix(self, scale: float, covariance: str = "low_rank") -> torch.Tensor:
        """s (diag(sigma^2) + D^T D / (K - 1)) as a dense d x d matrix (for tests on small d)."""
        cov = torch.diag(self.variance)
        if self.uses_low_rank(covariance):
            d = self.deviations.double()
            cov = cov + d.T @ d / (self.rank - 1)
        return scale * cov

    def num_stored(self) -> int:
        """Numbers the posterior keeps: mean, diagonal and K deviations."""
        return self.dim * (2 + self.rank)

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        return {"n": self.n, "mean": self.mean, "sq_mean": self.sq_mean, "deviations": self.deviations,
                "max_rank": self.max_rank, "var_clamp": self.var_clamp}

    @classmethod
    def from_state(cls, state: Mapping) -> SwagStatistics:
        stats = cls(state["mean"].numel(), int(state["max_rank"]), float(state["var_clamp"]))
        stats.n = int(state["n"])
        stats.mean, stats.sq_mean = state["mean"].double().clone(), state["sq_mean"].double().clone()
        stats.deviations = state["deviations"].float().clone()
        return stats
