"""The results store: one pandas table of every finished run's metric rows (csv + parquet).

The table is rebuilt from ``runs/*/metrics.json`` after every run, so it always matches what is on
disk, whatever order runs finished in and however often a suite was interrupted. When the suite
changes (a new OOD set, another learning rate), its run ids change; the folders of runs that are no
longer in the suite stay on disk (nothing computed is deleted) but are left out of the table: the
runner records the suite's run ids in ``OUT/manifest.json`` and the table keeps only those.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

ID_COLUMNS = ["model", "method", "method_name", "dataset", "eval_set", "split", "seed", "num_samples", "n_examples"]
METRIC_COLUMNS = ["acc", "ece", "nll", "brier", "entropy", "expected_entropy", "mi", "aurc", "acc_at_80_coverage",
                  "ood_auroc_mi", "ood_auroc_entropy"]
COST_COLUMNS = ["fit_seconds", "predict_seconds", "fit_peak_mem_mb", "peak_mem_mb", "trainable_params",
                "posterior_params", "forward_passes", "reused_cache"]
PROTOCOL_COLUMNS = ["template", "protocol", "n_bins", "k_policy", "suite", "run_id"]


MANIFEST = "manifest.json"


def write_manifest(out_dir: str | Path, suite: str, run_ids: list[str]) -> None:
    """Record which run folders belong to the suite last run into ``out_dir``."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"suite": suite, "run_ids": list(run_ids)}, indent=1))
    os.replace(tmp, path)


def suite_run_ids(out_dir: str | Path) -> set[str] | None:
    """The run ids of the suite last run into ``out_dir``; None for a folder without a manifest."""
    path = Path(out_dir) / MANIFEST
    return set(json.loads(path.read_text())["run_ids"]) if path.exists() else None


def stale_runs(out_dir: str | Path) -> list[str]:
    """Finished run folders that are not part of the current suite (kept on disk, left out of results)."""
    wanted = suite_run_ids(out_dir)
    if wanted is None:
        return []
    return sorted(p.parent.name for p in Path(out_dir, "runs").glob("*/metrics.json") if p.parent.name not in wanted)


def read_rows(out_dir: str | Path) -> list[dict]:
    """Every metric row of the finished runs that belong to the current suite (all runs without a manifest)."""
    wanted = suite_run_ids(out_dir)
    rows = []
    for path in sorted(Path(out_dir, "runs").glob("*/metrics.json")):
        if wanted is None or path.parent.name in wanted:
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
