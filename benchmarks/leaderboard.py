"""Leaderboard: metrics aggregated over seeds per (model, dataset, eval set, method), and the
per-phase time profile of the suite.

For each metric m over the n seeds: mean, sample std (ddof=1; 0 for a single seed) and the 95%
confidence half-width t_{0.975, n-1} * std / sqrt(n). Rows are ranked by NLL within each group.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy import stats

from bayeslora.profiling import PHASES

from .store import results_table

GROUP = ["model", "dataset", "eval_set", "method"]
SHOWN = ["acc", "ece", "nll", "brier", "mi", "aurc", "ood_auroc_mi", "ood_auroc_entropy"]
COSTS = ["trainable_params", "posterior_params", "fit_seconds", "predict_seconds", "forward_passes", "peak_mem_mb"]
LOWER_IS_BETTER = {"ece", "nll", "brier", "aurc"}


def aggregate(df: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per (model, dataset, eval_set, method): <m>_mean, <m>_std, <m>_ci95 and n_seeds."""
    metrics = [m for m in (metrics or SHOWN + COSTS) if m in df.columns and df[m].notna().any()]
    grouped = df.groupby(GROUP, sort=False)
    out = grouped.size().rename("n_seeds").to_frame()
    for m in metrics:
        g = grouped[m]
        mean, std, n = g.mean(), g.std(ddof=1).fillna(0.0), g.count()
        tcrit = n.map(lambda k: stats.t.ppf(0.975, k - 1) if k > 1 else float("nan"))
        out[f"{m}_mean"], out[f"{m}_std"], out[f"{m}_ci95"] = mean, std, tcrit * std / n.pow(0.5)
    out = out.reset_index()
    sort_key = "nll_mean" if "nll_mean" in out.columns else GROUP[-1]
    return out.sort_values(["model", "dataset", "eval_set", sort_key], kind="stable").reset_index(drop=True)


def _fmt(mean: float, std: float, metric: str) -> str:
    if pd.isna(mean):
        return "–"
    if metric in ("trainable_params", "posterior_params", "forward_passes"):
        return f"{mean:,.0f}"
    if metric in ("fit_seconds", "predict_seconds", "peak_mem_mb"):
        return f"{mean:.1f}"
    return f"{mean:.4f} ± {std:.4f}"


def display_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Human-readable 'mean ± std' cells."""
    cols = [m for m in SHOWN + COSTS if f"{m}_mean" in agg.columns]
    table = agg[GROUP + ["n_seeds"]].copy()
    for m in cols:
        table[m] = [_fmt(a, b, m) for a, b in zip(agg[f"{m}_mean"], agg[f"{m}_std"], strict=True)]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


def build_leaderboard(out_dir: str | Path) -> tuple[pd.DataFrame, str]:
    """Aggregate OUT/results.csv's rows and write OUT/leaderboard.csv and OUT/leaderboard.md."""
    out_dir = Path(out_dir)
    df = results_table(out_dir)
    if df.empty:
        raise FileNotFoundError(f"no finished runs under {out_dir}/runs; run `bayeslora run SUITE --out {out_dir}`")
    agg = aggregate(df)
    agg.to_csv(out_dir / "leaderboard.csv", index=False)
    parts = [f"# Leaderboard: {out_dir.name}\n",
             "Mean ± std over seeds; ranked by NLL within each (model, dataset, eval set). "
             "Costs: parameters, seconds, backbone forward passes per example at prediction, peak memory (MB).\n"]
    table = display_table(agg)
    for keys, group in table.groupby(["model", "dataset", "eval_set"], sort=False):
        parts.append(f"\n## {keys[0]} · trained on {keys[1]} · evaluated on {keys[2]}\n")
        parts.append(to_markdown(group.drop(columns=["model", "dataset", "eval_set"])))
    profile = phase_table(df)
    if not profile.empty:
        parts.append("\n## Where the time went (seconds per phase, summed over runs)\n")
        parts.append("Exclusive wall-clock seconds: `trunk` is the frozen lower layers (trunk cache), "
                     "`train` the fine-tuning loop, `fit` the rest of fitting, `predict` the posterior samples.\n\n")
        parts.append(to_markdown(format_seconds(profile)))
        profile.to_csv(out_dir / "profile.csv", index=False)
    markdown = "".join(parts)
    (out_dir / "leaderboard.md").write_text(markdown)
    return agg, markdown


def phase_table(df: pd.DataFrame) -> pd.DataFrame:
    """Seconds per phase (columns) summed over each method's runs (rows), plus a total row and column.

    A run's profile is repeated on each of its rows (one per evaluation set), so runs are
    de-duplicated by run_id first. Phases are exclusive: they add up to the run's wall time.
    """
    cols = [f"time_{p}" for p in PHASES if f"time_{p}" in df.columns]
    if not cols:
        return pd.DataFrame()
    runs = df.drop_duplicates("run_id")
    table = runs.groupby("method", sort=False)[cols].sum()
    table.columns = [c.removeprefix("time_") for c in cols]
    table.insert(0, "runs", runs.groupby("method", sort=False).size())
    table.loc["all methods"] = table.sum()
    table["total"] = table[[c.removeprefix("time_") for c in cols]].sum(axis=1)
    return table.reset_index()


def phase_comparison(before: pd.DataFrame, after: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """Suite-wide seconds per phase for two results folders and the speed-up ratio before/after."""
    a = phase_table(before).set_index("method").loc["all methods"].drop("runs")
    b = phase_table(after).set_index("method").loc["all methods"].drop("runs")
    out = pd.DataFrame({f"{names[0]} (s)": a, f"{names[1]} (s)": b})
    out["speed-up"] = [f"{x / y:.2f}x" if x > 0 and y > 0 else "–" for x, y in zip(a, b, strict=True)]
    return out.rename_axis("phase").reset_index()


def format_seconds(table: pd.DataFrame) -> pd.DataFrame:
    return table.apply(lambda col: col.map(lambda v: f"{v:.1f}" if isinstance(v, float) else v))
