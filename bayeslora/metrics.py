"""Every metric, computed in one place from (N, S, K) class logits and labels. Knows only tensors.

With p_s = softmax(z_s) and the predictive mean p = (1/S) sum_s p_s (computed as a log-mean-exp
in float64):
  acc   = mean_n 1[argmax_k p_nk = y_n]
  nll   = -mean_n log p_{n, y_n}
  brier = mean_n sum_k (p_nk - 1[k = y_n])^2
  confidence     = mean_n max_k p_nk;  overconfidence = confidence - acc (> 0: over-confident)
  ece   = sum_b |B_b|/N |acc(B_b) - conf(B_b)|, 15 equal-width bins of the top-label confidence
          (the same binning as torchmetrics' MulticlassCalibrationError(n_bins=15, norm="l1"))
  entropy          H[p]                    (total predictive uncertainty, nats)
  expected_entropy (1/S) sum_s H[p_s]      (aleatoric part)
  mi               H[p] - (1/S) sum_s H[p_s]  (epistemic part; 0 <= MI <= log K; 0 when S = 1)
  aurc  area under the risk-coverage curve when abstaining on the least confident first
  ood_auroc_*  AUROC of an uncertainty score separating OOD (positive) from in-distribution examples
"""

from __future__ import annotations

import math

import torch

N_BINS = 15


def log_predictive(logits: torch.Tensor) -> torch.Tensor:
    """log p (N, K) = log mean_s softmax(z_s), float64."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, S, K), got shape {tuple(logits.shape)}")
    log_p_s = torch.log_softmax(logits.double(), dim=-1)
    return torch.logsumexp(log_p_s, dim=1) - math.log(logits.shape[1])


def _entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -(log_p.exp() * log_p).sum(-1)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        raise ValueError(f"labels {bad} are out of range for K={num_classes} classes (valid: 0..{num_classes - 1})")


def uncertainty(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example entropy H[p], expected entropy and mutual information (nats)."""
    log_p = log_predictive(logits)
    total = _entropy(log_p)
    expected = _entropy(torch.log_softmax(logits.double(), dim=-1)).mean(dim=1)
    return {"entropy": total, "expected_entropy": expected, "mi": (total - expected).clamp(min=0.0)}


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> dict[str, torch.Tensor]:
    """Per-bin count, mean confidence and accuracy (float64, length n_bins + 1; empty bins hold NaN).

    Equal-width bins: bin b holds confidences in [b/n, (b+1)/n); a confidence of exactly 1.0 falls in
    a bin of its own (the last entry). This is torchmetrics' binning, so the ECE built on it agrees."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(confidence.double(), edges, right=True) - 1
    count = torch.bincount(idx, minlength=n_bins + 1).double()
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, confidence.double())
    correct_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, idx, correct.double())
    nonempty = count > 0
    nan = torch.full_like(count, float("nan"))
    return {"count": count, "confidence": torch.where(nonempty, conf_sum / count.clamp(min=1), nan),
            "accuracy": torch.where(nonempty, correct_sum / count.clamp(min=1), nan), "edges": edges}


def ece_from_bins(bins: dict[str, torch.Tensor]) -> float:
    """ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)| over the non-empty bins of :func:`reliability_bins`."""
    nonempty = bins["count"] > 0
    gap = (bins["accuracy"] - bins["confidence"]).abs()[nonempty]
    return float((bins["count"][nonempty] / bins["count"].sum() * gap).sum())


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = N_BINS) -> float:
    """ECE over :func:`reliability_bins` (see :func:`ece_from_bins`)."""
    return ece_from_bins(reliability_bins(confidence, correct, n_bins))


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage c_i = i/N and selective risk at each c when keeping the i most confident examples."""
    order = torch.argsort(confidence, descending=True, stable=True)
    errors = (~correct[order]).double()
    kept = torch.arange(1, len(order) + 1, dtype=torch.float64)
    return kept / len(order), errors.cumsum(0) / kept


def aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve (mean selective risk over coverages i/N)."""
    _, risk = risk_coverage(confidence, correct)
    return float(risk.mean())


def accuracy_at_coverage(confidence: torch.Tensor, correct: torch.Tensor, coverage: float) -> float:
    k = max(1, int(math.ceil(coverage * len(confidence))))
    order = torch.argsort(confidence, descending=True, stable=True)[:k]
    return float(correct[order].double().mean())


def auroc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney form of the ROC area."""
    if len(scores_pos) == 0 or len(scores_neg) == 0:
        return float("nan")
    scores = torch.cat([scores_pos, scores_neg]).double()
    ranks = _average_ranks(scores)
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    i = 0
    n = len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> dict[str, float]:
    """acc, nll, brier, ece, mean confidence and over-confidence, mean entropy / expected entropy / MI,
    aurc and accuracy at 80% coverage."""
    n, _, k = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    labels = labels.long()
    check_labels(labels, k)
    log_p = log_predictive(logits)
    p = log_p.exp()
    confidence, prediction = p.max(dim=-1)
    correct = prediction == labels
    one_hot = torch.nn.functional.one_hot(labels, k).double()
    unc = uncertainty(logits)
    acc = float(correct.double().mean())
    return {
        "acc": acc,
        "nll": float(-log_p.gather(1, labels[:, None]).mean()),
        "brier": float(((p - one_hot) ** 2).sum(-1).mean()),
        "ece": expected_calibration_error(confidence, correct, n_bins),
        "confidence": float(confidence.mean()),
        "overconfidence": float(confidence.mean()) - acc,
        "entropy": float(unc["entropy"].mean()),
        "expected_entropy": float(unc["expected_entropy"].mean()),
        "mi": float(unc["mi"].mean()),
        "aurc": aurc(confidence, correct),
        "acc_at_80_coverage": accuracy_at_coverage(confidence, correct, 0.8),
    }


LABEL_METRICS = ("acc", "nll", "brier", "ece", "overconfidence", "aurc", "acc_at_80_coverage")
"""The metrics of :func:`classification_metrics` that need labels (an unlabelled OOD set has none)."""

NOISE_FLOOR = 1e-6
"""Spreads and differences below this are float noise, not signal: the MI of a deterministic or
near-deterministic predictive is ~1e-9 nats of rounding, and a ranking of such values is arbitrary."""


def at_noise(values: torch.Tensor) -> bool:
    """Whether the spread max - min of ``values`` is below :data:`NOISE_FLOOR`."""
    return len(values) == 0 or float(values.max() - values.min()) < NOISE_FLOOR


def ood_metrics(logits_id: torch.Tensor, logits_ood: torch.Tensor) -> dict[str, float | str]:
    """AUROC of MI and of predictive entropy for telling OOD (positive) from ID examples.

    A score whose spread over all ID and OOD examples is at float noise (:func:`at_noise`) ranks
    nothing: its AUROC is NaN and ``ood_auroc_<score>_na`` says why (shown as "n/a")."""
    u_id, u_ood = uncertainty(logits_id), uncertainty(logits_ood)
    out: dict[str, float | str] = {}
    for score, label in (("mi", "MI"), ("entropy", "predictive entropy")):
        both = torch.cat([u_ood[score], u_id[score]])
        if at_noise(both):
            out[f"ood_auroc_{score}"] = float("nan")
            spread = float(both.max() - both.min()) if len(both) else 0.0
            out[f"ood_auroc_{score}_na"] = f"{label} spread {spread:.1e} is float noise (< {NOISE_FLOOR:g})"
        else:
            out[f"ood_auroc_{score}"] = auroc(u_ood[score], u_id[score])
    return out
