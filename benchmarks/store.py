"""The results store: one pandas table of every finished run's metric rows (csv + parquet).

The table is rebuilt from ``runs/*/metrics.json`` after every run, so it always matches what is on
disk, whatever order runs finished in and however often a suite was interrupted. When the suite
changes (a new OOD set, another learning rate), its run ids change; the folders of runs that are no
longer in the suite stay on disk (nothing computed is deleted) but are left out of the table: the
runner records the suite's run ids in ``OUT/manifest.json`` and the table keeps only those.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bayeslora.data import TASKS
from bayeslora.files import atomic_write, atomic_write_text, sha256_of

log = logging.getLogger(__name__)

ID_COLUMNS = ["model", "method", "method_name", "dataset", "eval_set", "split", "seed", "num_samples", "n_examples"]
METRIC_COLUMNS = ["acc", "ece", "nll", "brier", "confidence", "overconfidence", "entropy", "expected_entropy", "mi",
                  "aurc", "acc_at_80_coverage", "ood_auroc_mi", "ood_auroc_entropy"]
COST_COLUMNS = ["fit_seconds", "predict_seconds", "shared_train_seconds", "fit_peak_mem_mb", "peak_mem_mb",
                "trainable_params", "posterior_params", "forward_passes", "reused_cache"]
PROTOCOL_COLUMNS = ["template", "protocol", "n_bins", "k_policy", "suite", "protocol_id", "run_id", "code_version",
                    "method_code", "hardware"]

MANIFEST = "manifest.json"
METRICS = "metrics.json"
RUN_ID = re.compile(r"^[0-9a-f]{16}$")
"""Run folder names: the 16 hex digits of :attr:`benchmarks.suite.RunSpec.run_id`."""


def describe_files(run_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} of a run's files, recorded in its metrics.json."""
    return {n: {"bytes": (run_dir / n).stat().st_size, "sha256": sha256_of(run_dir / n)} for n in names}


@dataclass
class RunRecord:
    """A finished run folder's metrics.json, checked: its id is the folder's, its rows are mappings that
    name this run and known evaluation sets, and every file it lists is there with its recorded size."""

    run_id: str
    rows: list[dict[str, Any]]
    files: dict[str, dict[str, Any]]


def read_run(run_dir: Path) -> tuple[RunRecord | None, str]:
    """(record, "") for a finished, intact run folder; (None, why) otherwise. Reads JSON only; builds no
    path from file contents (file names must be plain names that the folder holds)."""
    if not RUN_ID.fullmatch(run_dir.name):
        return None, "its name is not a run id"
    path = run_dir / METRICS
    if not path.is_file():
        return None, "no metrics.json (unfinished)"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"metrics.json does not parse ({exc})"
    if not isinstance(data, dict) or data.get("run_id") != run_dir.name or not isinstance(data.get("rows"), list):
        return None, "metrics.json is not this run's (its run_id differs or it has no rows)"
    rows = data["rows"]
    for row in rows:
        if not isinstance(row, dict) or row.get("run_id") != run_dir.name:
            return None, "a row of metrics.json names another run"
        if row.get("eval_set") not in TASKS or row.get("dataset") not in TASKS:
            return None, f"a row names an unknown evaluation set {row.get('eval_set')!r}"
    files = data.get("files", {})
    if not isinstance(files, dict):
        return None, "metrics.json lists its files wrongly"
    for name, info in files.items():
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or not isinstance(info, dict):
            return None, f"metrics.json lists a file that is not a plain name ({name!r})"
        file = run_dir / name
        if not file.is_file() or file.stat().st_size != info.get("bytes"):
            return None, f"{name} is missing or truncated"
    return RunRecord(run_dir.name, rows, files), ""


def recorded_files(run_dir: Path) -> dict[str, Any] | None:
    """The {name: {bytes, sha256}} its metrics.json records for a run's files; None when it does not parse."""
    try:
        files = json.loads((run_dir / METRICS).read_text()).get("files", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def run_file_intact(run_dir: Path, name: str) -> bool:
    """Whether a run's file still has the sha256 its metrics.json recorded (True for files it does not list)."""
    files = recorded_files(run_dir)
    if files is None:
        return False
    info = files.get(name)
    return not isinstance(info, dict) or sha256_of(run_dir / name) == info.get("sha256")


def record_file(run_dir: Path, name: str) -> None:
    """Record a file added to (or rewritten in) a finished run, e.g. by ``bayeslora path``, in its metrics.json."""
    data = json.loads((run_dir / METRICS).read_text())
    data.setdefault("files", {}).update(describe_files(run_dir, [name]))
    atomic_write_text(run_dir / METRICS, json.dumps(data, indent=1))


def write_manifest(out_dir: str | Path, suite: str, titles: dict[str, str]) -> None:
    """Record which run folders belong to the suite last run into ``out_dir`` (run id -> title)."""
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps({"suite": suite, "run_ids": list(titles),
                                                            "titles": titles}, indent=1))


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest's run ids and titles (only well-formed run ids); None without a readable manifest."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        ids = [r for r in data["run_ids"] if isinstance(r, str) and RUN_ID.fullmatch(r)]
        titles = data.get("titles") if isinstance(data.get("titles"), dict) else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: it does not parse (%s)", path, exc)
        return None
    return {"suite": str(data.get("suite", "")), "run_ids": ids,
            "titles": {k: str(v) for k, v in titles.items() if k in ids}}


def suite_run_ids(out_dir: str | Path) -> set[str] | None:
    """The run ids of the suite last run into ``out_dir``; None for a folder without a manifest."""
    manifest = read_manifest(out_dir)
    return None if manifest is None else set(manifest["run_ids"])


def run_folders(out_dir: str | Path) -> list[Path]:
    """Folders under OUT/runs whose names are run ids (temporary folders, locks and others ignored)."""
    runs = Path(out_dir, "runs")
    return sorted(p for p in runs.iterdir() if p.is_dir() and RUN_ID.fullmatch(p.name)) if runs.is_dir() else []


def stale_runs(out_dir: str | Path) -> list[str]:
    """Finished run folders that are not part of the current suite (kept on disk, left out of results)."""
    wanted = suite_run_ids(out_dir)
    if wanted is None:
        return []
    return [p.name for p in run_folders(out_dir) if (p / METRICS).exists() and p.name not in wanted]


def read_rows(out_dir: str | Path) -> list[dict]:
    """Every metric row of the finished runs that belong to the current suite (all runs without a manifest);
    a run folder whose files do not check out is skipped with a warning naming it."""
    wanted = suite_run_ids(out_dir)
    rows = []
    for run_dir in run_folders(out_dir):
        if wanted is not None and run_dir.name not in wanted:
            continue
        record, why = read_run(run_dir)
        if record is None:
            if (run_dir / METRICS).exists():
                log.warning("skipping run folder %s: %s; `bayeslora run` redoes it", run_dir, why)
            continue
        rows.extend(record.rows)
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
    atomic_write(out_dir / "results.csv", lambda p: df.to_csv(p, index=False))
    atomic_write(out_dir / "results.parquet", lambda p: df.to_parquet(p, index=False))
    return df
