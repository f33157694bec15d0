"""Loss, accuracy and functional diversity along paths in LoRA weight space, and their barrier heights
(docs/methods.md, LoRA-Curve).

A path maps t in [0, 1] to a full set of LoRA weights; the backbone evaluates each point through
:meth:`~bayeslora.backbone.Backbone.class_logits_with`, so nothing is copied. For each path and
split the table holds, at T equally spaced t, loss(t) (mean NLL) and acc(t), and how the function at
phi(t) differs from the path's ends, with p_t(x) the point's predictive:

    disagree_start = mean_x [argmax p_t(x) != argmax p_0(x)]    (disagree_end: against p_1)
    js_start       = mean_x JS(p_t(x), p_0(x)),  JS(p, q) = H((p + q)/2) - (H(p) + H(q))/2   (js_end)
    mi_local       = mean_x [H(mean_u p_u(x)) - mean_u H(p_u(x))],  u over t's grid neighbours and t

(nats; mi_local is the mutual information of the ensemble of the three neighbouring points, two at the
ends). Per path and split,

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

from .config import Validated
from .data import EncodedSplit, make_loader
from .errors import ConfigError

if TYPE_CHECKING:
    from .backbone import Backbone

PATH_BASE_COLUMNS = ["path", "t", "split", "loss", "acc", "n_examples"]
"""What every path table has (tables written before the diversity columns have only these)."""
DIVERSITY_COLUMNS = ["disagree_start", "disagree_end", "js_start", "js_end", "mi_local"]
PATH_COLUMNS = PATH_BASE_COLUMNS + DIVERSITY_COLUMNS


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


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log p_k over the last axis (0 log 0 = 0)."""
    return -torch.special.xlogy(p, p).sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS(p, q) = H((p + q)/2) - (H(p) + H(q))/2 per row."""
    return entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2


def diversity_along(probs: list[torch.Tensor]) -> list[dict[str, float]]:
    """For each point i of a path (probs[i]: (N, K) predictive), disagreement and JS against both ends
    and the MI of its grid neighbourhood {i-1, i, i+1} (see the module docstring)."""
    start, end = probs[0], probs[-1]
    rows = []
    for i, p in enumerate(probs):
        near = torch.stack(probs[max(0, i - 1):i + 2])
        mi = entropy(near.mean(0)) - entropy(near).mean(0)
        rows.append({"disagree_start": (p.argmax(-1) != start.argmax(-1)).double().mean().item(),
                     "disagree_end": (p.argmax(-1) != end.argmax(-1)).double().mean().item(),
                     "js_start": js_divergence(p, start).mean().item(), "js_end": js_divergence(p, end).mean().item(),
                     "mi_local": mi.clamp(min=0).mean().item()})
    return rows


def evaluate_paths(backbone: Backbone, paths: Mapping[str, WeightPath], splits: Mapping[str, EncodedSplit],
                   settings: PathSettings) -> pd.DataFrame:
    """One row per (path, t, split): mean NLL, accuracy and functional diversity of the single weight point phi(t)."""
    settings.check()
    times = path_times(settings.points)
    rows = []
    with torch.inference_mode():
        for path_name, path in paths.items():
            points = [path.weights(t) for t in times]
            for split_name, split in splits.items():
                log_probs: list[list[torch.Tensor]] = [[] for _ in times]
                labels = []
                for batch in make_loader(split, settings.batch_size, limit=settings.max_examples):
                    labels.append(batch["labels"])
                    for i, weights in enumerate(points):
                        logits = backbone.class_logits_with(path.adapter, weights, batch).double()
                        log_probs[i].append(torch.log_softmax(logits, -1).cpu())
                y = torch.cat(labels)
                joined = [torch.cat(lp) for lp in log_probs]
                diversity = diversity_along([lp.exp() for lp in joined])
                for t, lp, div in zip(times, joined, diversity, strict=True):
                    rows.append({"path": path_name, "t": t, "split": split_name,
                                 "loss": -lp.gather(1, y[:, None]).mean().item(),
                                 "acc": (lp.argmax(-1) == y).double().mean().item(), "n_examples": len(y), **div})
    return pd.DataFrame(rows, columns=PATH_COLUMNS)


def barrier_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per (path, split): end losses, the highest loss, ``barrier``, ``barrier_interp``, the lowest accuracy and,
    where the table has them, the largest disagreement and JS divergence with the start and the mean local MI."""
    rows = []
    for (path, split), part in table.groupby(["path", "split"], sort=False):
        part = part.sort_values("t")
        t, loss = part["t"].to_numpy(), part["loss"].to_numpy()
        start, end = loss[0], loss[-1]
        rows.append({"path": path, "split": split, "loss_start": start, "loss_end": end, "loss_max": loss.max(),
                     "barrier": loss.max() - max(start, end),
                     "barrier_interp": (loss - ((1 - t) * start + t * end)).max(),
                     "acc_min": part["acc"].min(),
                     **({"disagree_max": part["disagree_start"].max(), "js_max": part["js_start"].max(),
                         "mi_local_mean": part["mi_local"].mean()} if "mi_local" in part else {})})
    return pd.DataFrame(rows)


def barrier_columns(table: pd.DataFrame) -> dict[str, float]:
    """``barrier_<path>_<split>`` for a results row."""
    return {f"barrier_{r.path}_{r.split}": float(r.barrier) for r in barrier_table(table).itertuples()}
