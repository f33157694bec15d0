"""Leaderboard: metrics aggregated over seeds per (model, dataset, eval set, method), and the
per-phase time profile of the suite.

For each metric m over the n seeds: mean, sample std (ddof=1; 0 for a single seed) and the 95%
confidence half-width t_{0.975, n-1} * std / sqrt(n). Rows are ranked by NLL within each group, and
the best mean of each quality metric is marked (ties all marked). Each group's table is preceded by
its evaluation protocol. Formats: Markdown (leaderboard.md), CSV (leaderboard.csv, the numbers)
and LaTeX (leaderboard.tex, booktabs table fragments).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy import stats

from bayeslora import ConfigError
from bayeslora.profiling import CACHES, PHASES

from .tables import to_latex, to_markdown

GROUP = ["model", "dataset", "eval_set", "method"]
SHOWN = ["acc", "ece", "nll", "brier", "overconfidence", "mi", "aurc", "ood_auroc_mi", "ood_auroc_entropy"]
COSTS = ["trainable_params", "posterior_params", "fit_seconds", "predict_seconds", "shared_train_seconds",
         "forward_passes", "fit_peak_mem_mb", "peak_mem_mb"]
LOWER_IS_BETTER = {"ece", "nll", "brier", "aurc"}
HIGHER_IS_BETTER = {"acc", "acc_at_80_coverage", "ood_auroc_mi", "ood_auroc_entropy"}


def aggregate(df: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per (model, dataset, eval_set, method): <m>_mean, <m>_std, <m>_ci95 and n_seeds."""
    metrics = [m for m in (metrics or SHOWN + COSTS) if m in df.columns
               and (df[m].notna().any() or (f"{m}_na" in df.columns and df[f"{m}_na"].notna().any()))]
    grouped = df.groupby(GROUP, sort=False)
    out = grouped.size().rename("n_seeds").to_frame()
    if "source" in df.columns and df["source"].nunique() > 1:  # merged folders: where each row's runs come from
        out["sources"] = grouped["source"].agg(lambda s: ", ".join(dict.fromkeys(s)))
    for m in metrics:
        g = grouped[m]
        mean, std, n = g.mean(), g.std(ddof=1).fillna(0.0), g.count()
        tcrit = n.map(lambda k: stats.t.ppf(0.975, k - 1) if k > 1 else float("nan"))
        out[f"{m}_mean"], out[f"{m}_std"], out[f"{m}_ci95"] = mean, std, tcrit * std / n.pow(0.5)
        if f"{m}_na" in df.columns:  # why a metric is not reported (e.g. a score at float noise)
            out[f"{m}_na"] = grouped[f"{m}_na"].first()
    out = out.reset_index()
    sort_key = "nll_mean" if "nll_mean" in out.columns else GROUP[-1]
    return out.sort_values(["model", "dataset", "eval_set", sort_key], kind="stable").reset_index(drop=True)


MISSING = "–"
NOT_APPLICABLE = "n/a"
HEADERS = {"n_seeds": "seeds", "sources": "from", "acc": "acc ↑", "ece": "ECE ↓", "nll": "NLL ↓", "brier": "Brier ↓",
           "mi": "MI",
           "aurc": "AURC ↓", "acc_at_80_coverage": "acc@80% ↑", "ood_auroc_mi": "OOD AUROC (MI) ↑",
           "ood_auroc_entropy": "OOD AUROC (H) ↑", "trainable_params": "trainable params",
           "posterior_params": "posterior params", "fit_seconds": "fit s", "predict_seconds": "predict s",
           "shared_train_seconds": "MAP training s", "confidence": "confidence", "overconfidence": "conf − acc",
           "forward_passes": "passes / example", "fit_peak_mem_mb": "fit peak MB",
           "peak_mem_mb": "predict peak MB"}


def format_cell(mean: float, std: float, metric: str, n_seeds: int) -> str:
    """'mean ± std' (no ± for a single seed); MI in scientific notation, its values being small."""
    if pd.isna(mean):
        return MISSING
    if metric in ("trainable_params", "posterior_params", "forward_passes"):
        return f"{mean:,.0f}"
    if metric in ("fit_seconds", "predict_seconds", "shared_train_seconds", "fit_peak_mem_mb", "peak_mem_mb"):
        return f"{mean:.1f}"
    spec = ".2e" if metric == "mi" else ".4f"
    return f"{mean:{spec}}" if n_seeds < 2 else f"{mean:{spec}} ± {std:{spec}}"


def display_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Human-readable 'mean ± std' cells."""
    cols = [m for m in SHOWN + COSTS if f"{m}_mean" in agg.columns]
    table = agg[GROUP + ["n_seeds"] + (["sources"] if "sources" in agg.columns else [])].copy()
    for m in cols:
        notes = agg[f"{m}_na"] if f"{m}_na" in agg.columns else pd.Series(None, agg.index, dtype=object)
        table[m] = [NOT_APPLICABLE if pd.isna(a) and isinstance(note, str) else format_cell(a, b, m, n)
                    for a, b, n, note in zip(agg[f"{m}_mean"], agg[f"{m}_std"], agg["n_seeds"], notes, strict=True)]
    return table


def not_applicable_notes(agg: pd.DataFrame) -> list[str]:
    """One line per (method, metric) shown as n/a, with the reason."""
    lines = []
    for m in SHOWN:
        if f"{m}_na" in agg.columns:
            for row in agg[agg[f"{m}_mean"].isna() & agg[f"{m}_na"].notna()].itertuples(index=False):
                lines.append(f"{HEADERS.get(m, m)} of {row.method} on {row.eval_set}: {NOT_APPLICABLE}, "
                             f"{getattr(row, f'{m}_na')}")
    return list(dict.fromkeys(lines))


def best_marks(agg: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """True where a cell of ``table`` (display_table of ``agg``, same rows) holds the best mean of
    its quality metric among the rows; MI and costs are not ranked."""
    marks = pd.DataFrame(False, index=table.index, columns=table.columns)
    for m in table.columns:
        if m not in LOWER_IS_BETTER | HIGHER_IS_BETTER or f"{m}_mean" not in agg.columns:
            continue
        values = agg.loc[table.index, f"{m}_mean"]
        if values.notna().sum() < 2:
            continue
        best = values.min() if m in LOWER_IS_BETTER else values.max()
        marks[m] = (values - best).abs() <= 1e-12
    return marks


def protocol_line(rows: pd.DataFrame) -> str:
    """The evaluation protocol of one (model, dataset, eval set) group, from its result rows."""
    def values(col: str) -> str:
        if col not in rows.columns:
            return "?"
        found = list(rows[col].dropna().unique())
        try:
            found.sort()
        except TypeError:
            found.sort(key=str)
        return ", ".join(str(v) for v in found) or "?"
    return (f"split {values('split')}; N = {values('n_examples')} examples; S = {values('num_samples')} samples; "
            f"ECE with {values('n_bins')} equal-width bins; prompt template {values('template')}; "
            f"answer options: {values('k_policy')}; data {values('protocol')}")


def leaderboard_groups(df: pd.DataFrame, agg: pd.DataFrame):
    """(model, dataset, eval set), protocol line, display table and best-cell marks per group."""
    table = display_table(agg)
    for keys, group in table.groupby(["model", "dataset", "eval_set"], sort=False):
        rows = df[(df.model == keys[0]) & (df.dataset == keys[1]) & (df.eval_set == keys[2])]
        shown = group.drop(columns=["model", "dataset", "eval_set"])
        shown = shown.loc[:, [c for c in shown.columns if not (shown[c] == MISSING).all()]]
        marks = best_marks(agg, shown)
        yield keys, protocol_line(rows), shown.rename(columns=HEADERS), marks.rename(columns=HEADERS)


def group_title(keys: tuple[str, str, str]) -> str:
    model, dataset, eval_set = keys
    where = "in distribution" if dataset == eval_set else "out of distribution"
    return f"{model} · trained on {dataset} · evaluated on {eval_set} ({where})"


def leaderboard_latex(df: pd.DataFrame, agg: pd.DataFrame) -> str:
    """One booktabs table per group, captioned with its title and protocol."""
    parts = ["% bayeslora leaderboard: mean ± std over seeds, best in bold. "
             "Needs \\usepackage{booktabs} and \\usepackage{graphicx}.\n"]
    for i, (keys, protocol, table, marks) in enumerate(leaderboard_groups(df, agg)):
        parts.append(to_latex(table, marks, caption=f"{group_title(keys)}. {protocol}.",
                              label=f"tab:{keys[1]}-{keys[2]}-{i}".replace("_", "-")))
    return "\n".join(parts)


def build_leaderboard(dirs: str | Path | list[str | Path], out_dir: str | Path | None = None,
                      pool: bool = False) -> tuple[pd.DataFrame, str]:
    """Aggregate the rows of one results folder, or of several (:func:`benchmarks.merge.merged_results`:
    provenance kept, protocols not pooled unless ``pool``), and write leaderboard.{csv,md,tex} (and
    profile.csv) into ``out_dir`` (default: the one folder; required for several)."""
    from .merge import folder_labels, merged_results, provenance_table

    dirs = [Path(d) for d in ([dirs] if isinstance(dirs, str | Path) else dirs)]
    if out_dir is None and len(dirs) > 1:
        raise ConfigError("--out: several results folders are merged into a folder of their own; name it")
    out_dir = Path(out_dir) if out_dir is not None else dirs[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    df = merged_results(dirs, pool=pool)
    agg = aggregate(df)
    agg.to_csv(out_dir / "leaderboard.csv", index=False)
    title = out_dir.name if len(dirs) == 1 else " + ".join(folder_labels(dirs))
    parts = [f"# Leaderboard: {title}\n",
             "Mean ± std over seeds; ranked by NLL within each (model, dataset, eval set); best value per "
             "quality column in bold. Costs: parameters, seconds, backbone forward passes per example at "
             "prediction, peak memory (MB).\n"]
    for keys, protocol, table, marks in leaderboard_groups(df, agg):
        parts.append(f"\n## {group_title(keys)}\n\nProtocol: {protocol}.\n\n")
        parts.append(to_markdown(table, marks))
    if len(dirs) > 1:
        parts.append("\n## Provenance\n\nEach row's `from` names its folders. A method whose folders ran it under "
                     "different protocols is listed once per folder (`method @ folder`)"
                     + (", pooled here on request" if pool else "") + ".\n\n")
        parts.append(to_markdown(provenance_table(df)))
    notes = not_applicable_notes(agg)
    if notes:
        parts.append("\n## Not applicable (n/a)\n\n" + "".join(f"- {n}\n" for n in notes))
    profile = phase_table(df)
    if not profile.empty:
        parts.append("\n## Where the time went (seconds per phase, summed over runs)\n")
        parts.append("Exclusive wall-clock seconds: `trunk` is the frozen lower layers (trunk cache), "
                     "`train` the fine-tuning loop, `fit` the rest of fitting, `predict` the posterior samples.\n\n")
        parts.append(to_markdown(format_seconds(profile)))
        profile.to_csv(out_dir / "profile.csv", index=False)
    markdown = "".join(parts)
    (out_dir / "leaderboard.md").write_text(markdown)
    (out_dir / "leaderboard.tex").write_text(leaderboard_latex(df, agg))
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


def cache_table(df: pd.DataFrame) -> pd.DataFrame:
    """Seconds spent filling each shared cache, summed over the runs that filled it (charged to the cache,
    not to those runs' fit or predict seconds)."""
    cols = [f"cache_{c}_seconds" for c in CACHES if f"cache_{c}_seconds" in df.columns]
    if not cols:
        return pd.DataFrame()
    runs = df.drop_duplicates("run_id")
    return pd.DataFrame({"cache": [c.removeprefix("cache_").removesuffix("_seconds") for c in cols],
                         "seconds": [float(runs[c].sum()) for c in cols],
                         "runs that filled it": [int((runs[c] > 0).sum()) for c in cols]})


def phase_comparison(before: pd.DataFrame, after: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    """Suite-wide seconds per phase for two results folders and the speed-up ratio before/after."""
    a = phase_table(before).set_index("method").loc["all methods"].drop("runs")
    b = phase_table(after).set_index("method").loc["all methods"].drop("runs")
    out = pd.DataFrame({f"{names[0]} (s)": a, f"{names[1]} (s)": b})
    out["speed-up"] = [f"{x / y:.2f}x" if x > 0 and y > 0 else "–" for x, y in zip(a, b, strict=True)]
    return out.rename_axis("phase").reset_index()


def format_seconds(table: pd.DataFrame) -> pd.DataFrame:
    return table.apply(lambda col: col.map(lambda v: f"{v:.1f}" if isinstance(v, float) else v))
