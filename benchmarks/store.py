"""The results store: one pandas table of every finished run's metric rows (csv + parquet).

The table is rebuilt from ``runs/*/metrics.json`` after every run, so it always matches what is on
disk, whatever order runs finished in and however often a suite was interrupted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

ID_COLUMNS = ["model", "method", "method_name", "dataset", "eval_set", "split", "seed", "num_samples", "n_examples"]
METRIC_COLUMNS = ["acc", "ece", "nll", "brier", "entropy", "expected_entropy", "mi", "aurc", "acc_at_80_coverage",
                  "ood_auroc_mi", "ood_auroc_entropy"]
COST_COLUMNS = ["fit_seconds", "predict_seconds", "peak_mem_mb", "trainable_params", "posterior_params",
                "forward_passes", "reused_cache"]
PROTOCOL_COLUMNS = ["template", "protocol", "n_bins", "k_policy", "suite", "run_id"]


def read_rows(out_dir: str | Path) -> list[dict]:
    rows = []
    for path in sorted(Path(out_dir, "runs").glob("*/metrics.json")):
        rows.extend(json.loads(path.read_text())["rows"])
    return rows


def results_table(out_dir: str | Path) -> pd.DataFrame:
    df = pd.DataFrame(read_rows(out_dir))
    if df.empty:
        return df
    ordered = [c for c in ID_COLUMNS + METRIC_COLUMNS + COST_COLUMNS + PROTOCOL_COLUMNS if c in df.columns]
    rest = [c for c in df.columns if c not in ordered]
    return df[ordered + rest].sort_values(["model", "dataset", "eval_set", "method", "seed"], kind="stable")


def write_results(out_dir: str | Path) -> pd.DataFrame:
    """Write OUT/results.csv and OUT/results.parquet atomically; returns the table."""
    out_dir = Path(out_dir)
    df = results_table(out_dir)
    if df.empty:
        return df
    for name, writer in (("results.csv", lambda p: df.to_csv(p, index=False)),
                         ("results.parquet", lambda p: df.to_parquet(p, index=False))):
        tmp = out_dir / f".{name}.tmp"
        writer(tmp)
        os.replace(tmp, out_dir / name)
    return df
