"""Loss and accuracy along paths in LoRA weight space, and their barrier heights (docs/methods.md, LoRA-Curve).

A path maps t in [0, 1] to a full set of LoRA weights; the backbone evaluates each point through
:meth:`~bayeslora.backbone.Backbone.class_logits_with`, so nothing is copied. For each path and
split the table holds loss(t) (mean NLL) and acc(t) at T equally spaced t, and

    barrier        = max_t loss(t) - max(loss(0), loss(1))
    barrier_interp = max_t [loss(t) - ((1 - t) loss(0) + t loss(1))]

(positive: the path climbs over a ridge between its ends; <= 0: no barrier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import pandas as pd
import torch
import torch.nn.functional as F

from .config import Validated
from .data import EncodedSplit, make_loader
from .errors import ConfigError

if TYPE_CHECKING:
    from .backbone import Backbone

PATH_COLUMNS = ["path", "t", "split", "loss", "acc", "n_examples"]


@dataclass
class WeightPath:
    """t -> LoRA weights for adapter ``adapter`` (keys as in ``Backbone.lora_parameters``)."""

    adapter: str
    weights: Callable[[float], dict[str, torch.Tensor]]


@dataclass
class PathSettings(Validated):
    """``points``: T values of t; ``splits``: which of train/val/test; ``max_examples``: first N per split."""

    config_name: ClassVar[str] = "path"

    points: int = 21
    """T, the number of values of t in [0, 1]."""
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    """Which of train, val, test."""
    max_examples: int | None = None
    """The first N examples of each split (None: all)."""
    batch_size: int = 16
    """Evaluation batch size."""

    def check(self) -> None:
        if self.points < 2:
            raise ConfigError(f"path.points must be >= 2 (both ends and the points between), got {self.points}")
        bad = sorted(set(self.splits) - {"train", "val", "test"})
        if bad or not self.splits:
            raise ConfigError(f"path.splits must list some of train, val, test; got {self.splits}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"path.max_examples must be positive or null (all), got {self.max_examples}")


def path_times(points: int) -> list[float]:
    return torch.linspace(0, 1, points, dtype=torch.float64).tolist()


def evaluate_paths(backbone: Backbone, paths: Mapping[str, WeightPath], splits: Mapping[str, EncodedSplit],
                   settings: PathSettings) -> pd.DataFrame:
    """One row per (path, t, split): mean NLL and accuracy of the single weight point phi(t)."""
    settings.check()
    times = path_times(settings.points)
    rows = []
    with torch.inference_mode():
        for path_name, path in paths.items():
            points = [path.weights(t) for t in times]
            for split_name, split in splits.items():
                nll, correct, n = [0.0] * len(times), [0] * len(times), 0
                for batch in make_loader(split, settings.batch_size, limit=settings.max_examples):
                    labels = batch["labels"].to(backbone.device)
                    for i, weights in enumerate(points):
                        logits = backbone.class_logits_with(path.adapter, weights, batch).double()
                        nll[i] += F.cross_entropy(logits, labels, reduction="sum").item()
                        correct[i] += int((logits.argmax(-1) == labels).sum())
                    n += len(labels)
                rows += [{"path": path_name, "t": t, "split": split_name, "loss": nll[i] / n, "acc": correct[i] / n,
                          "n_examples": n} for i, t in enumerate(times)]
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


def barrier_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per (path, split): end losses, the highest loss, ``barrier``, ``barrier_interp`` and the lowest accuracy."""
    rows = []
    for (path, split), part in table.groupby(["path", "split"], sort=False):
        part = part.sort_values("t")
        t, loss = part["t"].to_numpy(), part["loss"].to_numpy()
        start, end = loss[0], loss[-1]
        rows.append({"path": path, "split": split, "loss_start": start, "loss_end": end, "loss_max": loss.max(),
                     "barrier": loss.max() - max(start, end),
                     "barrier_interp": (loss - ((1 - t) * start + t * end)).max(),
                     "acc_min": part["acc"].min()})
    return pd.DataFrame(rows)


def barrier_columns(table: pd.DataFrame) -> dict[str, float]:
    """``barrier_<path>_<split>`` for a results row."""
    return {f"barrier_{r.path}_{r.split}": float(r.barrier) for r in barrier_table(table).itertuples()}
