"""The one output every posterior produces: (N examples, S samples, K classes) class logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Cost:
    """What producing a predictive cost. Forward passes count backbone (trunk) evaluations per example."""

    forward_passes: int = 0
    wall_seconds: float = 0.0
    peak_mem_mb: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Predictive:
    """Class logits of S posterior samples for N examples.

    ``logits`` is float32 (N, S, K); choices an example does not have hold a very negative
    logit (:data:`MASKED_LOGIT`) so that their probability is exactly zero.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    example_ids: list[str]
    cost: Cost = field(default_factory=Cost)

    def __post_init__(self) -> None:
        if self.logits.ndim != 3:
            raise ValueError(f"Predictive.logits must be (N, S, K); got shape {tuple(self.logits.shape)}")
        n = self.logits.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"Predictive.labels must be ({n},); got {tuple(self.labels.shape)}")
        if len(self.example_ids) != n:
            raise ValueError(f"Predictive.example_ids has {len(self.example_ids)} ids for {n} examples")
        self.logits = self.logits.detach().float().cpu()
        self.labels = self.labels.detach().long().cpu()

    @property
    def num_samples(self) -> int:
        return self.logits.shape[1]

    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "logits": self.logits,
                "labels": self.labels,
                "example_ids": list(self.example_ids),
                "cost": self.cost.to_dict(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> Predictive:
        """Read a file written by :meth:`save` (``weights_only``: never code); anything else raises
        DamagedFileError naming the file."""
        from .files import DamagedFileError, safe_torch_load

        d = safe_torch_load(Path(path))
        try:
            tensors = isinstance(d, dict) and all(isinstance(d[k], torch.Tensor) for k in ("logits", "labels"))
            if not (tensors and isinstance(d["example_ids"], list) and isinstance(d.get("cost", {}), dict)):
                raise TypeError("unexpected contents")
            defaults = Cost()
            cost = Cost(**{k: type(getattr(defaults, k))(v) for k, v in d.get("cost", {}).items()
                           if k in Cost.__dataclass_fields__})
            return cls(d["logits"], d["labels"], [str(e) for e in d["example_ids"]], cost)
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedFileError(f"{path} is not a predictive file ({exc})") from exc


MASKED_LOGIT = -1.0e9
"""Logit given to answer options an example does not have (e.g. a 3-choice ARC question when K=5)."""
