"""Paired comparison of every method with a reference method (MAP by default).

Runs are paired by (model, dataset, eval set, seed): method seed s against the reference's seed s,
which saw the same data split and, for methods built on the MAP adapter, the same adapter. For
each metric m:

    delta_s = m(method, s) - m(reference, s),   mean and sample std over the n paired seeds,
    p_seeds = paired t-test: one-sample t-test of the deltas against 0 (= scipy.stats.ttest_rel; n >= 2),

and, because many methods run one seed only, a test over examples that needs just one pair:

    d_n     = NLL_n(method) - NLL_n(reference), averaged over the paired seeds per example n,
    p_examples = Wilcoxon signed-rank test of the d_n (scipy.stats.wilcoxon).

Marks: ``*`` p_seeds < alpha, ``†`` p_examples < alpha (alpha = 0.05, no multiple-testing correction).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats

from bayeslora.metrics import NOISE_FLOOR, log_predictive

from .analysis import RunPredictive, by_run, run_key

PAIR_KEYS = ["model", "dataset", "eval_set"]
COMPARED = ["acc", "nll", "ece", "brier"]
ALPHA = 0.05


NOISE_NOTE = "differences at float noise"


def at_noise(differences: np.ndarray) -> bool:
    """Every difference is below the float-noise floor: a test of them would rank rounding errors."""
    return bool(np.all(np.abs(differences) < NOISE_FLOOR))


def _seed_test(deltas: np.ndarray) -> float:
    if len(deltas) < 2 or np.allclose(deltas, deltas[0]) or at_noise(deltas):
        return float("nan")
    return float(stats.ttest_1samp(deltas, 0.0).pvalue)


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(y_n | x_n) per example under the predictive mean (1/S) sum_s softmax(z_s)."""
    return -log_predictive(logits).gather(1, labels[:, None]).squeeze(1)


def _example_test(pairs: list[tuple[RunPredictive, RunPredictive]]) -> tuple[float, int]:
    """Wilcoxon p-value of the per-example NLL differences (averaged over seeds), and N."""
    diffs: dict[str, list[float]] = {}
    for run, ref in pairs:
        ref_index = {e: i for i, e in enumerate(ref.predictive.example_ids)}
        a = example_nll(run.predictive.logits, run.predictive.labels)
        b = example_nll(ref.predictive.logits, ref.predictive.labels)
        for i, example in enumerate(run.predictive.example_ids):
            if example in ref_index:
                diffs.setdefault(example, []).append(float(a[i] - b[ref_index[example]]))
    d = np.array([np.mean(v) for v in diffs.values()])
    if len(d) < 2 or at_noise(d):
        return float("nan"), len(d)
    return float(stats.wilcoxon(d).pvalue), len(d)


def pairwise_table(results: pd.DataFrame, predictives: list[RunPredictive] | None = None,
                   reference: str = "map", metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per (model, dataset, eval set, method != reference): n_pairs, delta_<m>_mean/std,
    p_seeds_<m> for each metric, and p_examples_nll / n_examples when predictives are given."""
    metrics = [m for m in (metrics or COMPARED) if m in results.columns]
    index = by_run(predictives or [])
    rows = []
    for keys, group in results.groupby(PAIR_KEYS, sort=False):
        ref = group[group.method == reference].set_index("seed")
        if ref.empty:
            continue
        for method, runs in group[group.method != reference].groupby("method", sort=False):
            runs = runs.set_index("seed")
            seeds = sorted(set(runs.index) & set(ref.index))
            if not seeds:
                continue
            row = dict(zip(PAIR_KEYS, keys, strict=True), method=method, n_pairs=len(seeds))
            for m in metrics:
                deltas = (runs.loc[seeds, m] - ref.loc[seeds, m]).to_numpy(dtype=float)
                row[f"delta_{m}_mean"] = float(deltas.mean())
                row[f"delta_{m}_std"] = float(deltas.std(ddof=1)) if len(deltas) > 1 else 0.0
                row[f"p_seeds_{m}"] = _seed_test(deltas)
                if len(deltas) > 1 and at_noise(deltas):
                    row[f"p_seeds_{m}_na"] = NOISE_NOTE
            pairs = [(index[run_key(*keys, method, s)], index[run_key(*keys, reference, s)]) for s in seeds
                     if run_key(*keys, method, s) in index and run_key(*keys, reference, s) in index]
            if pairs:
                row["p_examples_nll"], row["n_examples"] = _example_test(pairs)
                if row["n_examples"] > 1 and pd.isna(row["p_examples_nll"]):
                    row["p_examples_nll_na"] = NOISE_NOTE
            rows.append(row)
    return pd.DataFrame(rows)


def significance_marks(row: pd.Series, metric: str, alpha: float = ALPHA) -> str:
    """'*' when the seed-level test rejects, '†' when the example-level NLL test does (nll only)."""
    marks = "*" if row.get(f"p_seeds_{metric}", float("nan")) < alpha else ""
    if metric == "nll" and row.get("p_examples_nll", float("nan")) < alpha:
        marks += "†"
    return marks
