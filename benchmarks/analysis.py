"""Per-example analyses behind the report's figures, computed from the saved predictives.

Every function here takes (N, S, K) logits (or a list of them, one per seed) and returns plain
tensors or pandas tables; the figures only draw what these return.

- reliability: the bins of :func:`bayeslora.metrics.reliability_bins`, pooled over seeds
  (counts and sums add up, so pooled accuracy/confidence are example-weighted).
- coverage curve: accuracy of the i most confident examples at coverage i/N, averaged over seeds.
- metrics vs S: acc / ECE / NLL of the predictive built from s of the S stored samples, at evenly
  spaced sample indices round(linspace(0, S-1, s)). For i.i.d. samplers that is a draw of size s;
  for grid-based predictions (lora_curve's t grid) it is the coarser grid over the same range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from bayeslora import Predictive
from bayeslora.data import TASKS
from bayeslora.files import DamagedFileError
from bayeslora.metrics import classification_metrics, log_predictive, reliability_bins, uncertainty

from .store import RUN_ID, run_file_intact


def predictive_name(dataset: str, eval_set: str) -> str:
    """The file name of a run's predictive for one evaluation set (both must be known task names)."""
    for name in (dataset, eval_set):
        if name not in TASKS:
            raise DamagedFileError(f"unknown evaluation set {name!r} in a results row")
    return "predictive.pt" if eval_set == dataset else f"predictive-{eval_set}.pt"


def predictive_path(run_dir: Path, dataset: str, eval_set: str) -> Path:
    """Where the runner saved a run's predictive for one evaluation set."""
    return run_dir / predictive_name(dataset, eval_set)


@dataclass
class RunPredictive:
    """One row of the results table with its saved predictive."""

    model: str
    method: str
    seed: int
    dataset: str
    eval_set: str
    predictive: Predictive


def load_predictives(out_dirs: Path | list[Path], results: pd.DataFrame) -> tuple[list[RunPredictive], list[str]]:
    """The predictive behind every results row (read from ``out_dirs[row.folder]``, or the one folder);
    also the rows whose file is missing (as messages)."""
    out_dirs = [out_dirs] if isinstance(out_dirs, Path) else out_dirs
    found, missing = [], []
    for row in results.itertuples(index=False):
        where = f"{row.method} / {row.eval_set} / seed {row.seed}"
        if not RUN_ID.fullmatch(str(row.run_id)):
            missing.append(f"{where}: the row's run id {str(row.run_id)[:40]!r} is not a run id")
            continue
        run_dir = out_dirs[int(getattr(row, "folder", 0))] / "runs" / str(row.run_id)
        try:
            path = predictive_path(run_dir, row.dataset, row.eval_set)
            if not path.exists():
                missing.append(f"{where}: {path.name} not in runs/{row.run_id}")
                continue
            if not run_file_intact(run_dir, path.name):
                raise DamagedFileError(f"{path} does not match the checksum in its metrics.json")
            predictive = Predictive.load(path)
        except DamagedFileError as exc:
            missing.append(f"{where}: {exc}")
            continue
        found.append(RunPredictive(row.model, row.method, int(row.seed), row.dataset, row.eval_set, predictive))
    return found, missing


def run_key(model: str, dataset: str, eval_set: str, method: str, seed: int) -> tuple[str, str, str, str, int]:
    return model, dataset, eval_set, method, int(seed)


def by_run(predictives: list[RunPredictive]) -> dict[tuple[str, str, str, str, int], RunPredictive]:
    """Predictives indexed by (model, dataset, eval set, method, seed)."""
    return {run_key(p.model, p.dataset, p.eval_set, p.method, p.seed): p for p in predictives}


def confidence_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence max_k p_nk of the predictive mean, and whether its argmax is the label."""
    confidence, prediction = log_predictive(logits).exp().max(dim=-1)
    return confidence, prediction == labels


def pooled_reliability(predictives: list[Predictive], n_bins: int) -> dict[str, torch.Tensor]:
    """Reliability bins over the examples of all seeds together."""
    conf, correct = zip(*(confidence_and_correct(p.logits, p.labels) for p in predictives), strict=True)
    return reliability_bins(torch.cat(conf), torch.cat(correct), n_bins)


def coverage_curve(predictives: list[Predictive]) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage i/N, accuracy of the i most confident examples), averaged over seeds of equal N."""
    curves = []
    for p in predictives:
        conf, correct = confidence_and_correct(p.logits, p.labels)
        order = torch.argsort(conf, descending=True, stable=True)
        kept = torch.arange(1, len(order) + 1, dtype=torch.float64)
        curves.append(correct[order].double().cumsum(0) / kept)
    if len({len(c) for c in curves}) != 1:
        raise ValueError(f"coverage curves over seeds need the same test set; got sizes {[len(c) for c in curves]}")
    acc = torch.stack(curves).mean(0)
    return torch.arange(1, len(acc) + 1, dtype=torch.float64) / len(acc), acc


def sample_subsets(num_samples: int) -> list[int]:
    """Sample counts s at which metrics-vs-S is evaluated: 1, 2, 3, 5, 10, 20, ... up to S, and S."""
    counts = [s for s in (1, 2, 3, 5, 10, 20, 30, 50, 100) if s < num_samples]
    return counts + [num_samples]


def evenly_spaced(num_samples: int, s: int) -> torch.Tensor:
    """Indices round(linspace(0, S-1, s)): s of the S stored samples, spread over the whole set."""
    return torch.linspace(0, num_samples - 1, s).round().long().unique()


def metrics_vs_samples(predictives: list[Predictive], n_bins: int) -> pd.DataFrame:
    """acc, ece and nll (mean over seeds) of the predictive from s of the S samples, for each s."""
    num_samples = min(p.num_samples for p in predictives)
    rows = []
    for s in sample_subsets(num_samples):
        per_seed = [classification_metrics(p.logits[:, evenly_spaced(p.num_samples, s)], p.labels, n_bins)
                    for p in predictives]
        rows.append({"samples": s, **{m: sum(r[m] for r in per_seed) / len(per_seed) for m in ("acc", "ece", "nll")}})
    return pd.DataFrame(rows)


def uncertainty_scores(predictives: list[Predictive]) -> dict[str, torch.Tensor]:
    """Per-example MI and predictive entropy, concatenated over seeds."""
    parts = [uncertainty(p.logits) for p in predictives]
    return {key: torch.cat([u[key] for u in parts]) for key in ("mi", "entropy")}
