"""Results of several folders (other machines, other people) in one table, each row with its provenance.

Every row keeps ``source`` (the folder's label), ``folder`` (its position in the list given), and the
provenance its run recorded: ``suite``, ``code_version``, ``hardware``. Runs are pooled over seeds only
within one protocol (:attr:`benchmarks.suite.RunSpec.protocol_id`: the settings, model and data, not the
seed or the code; rows written before that column existed use their suite name): when one method label
has rows of two protocols, each protocol's rows are relabelled ``<method> @ <source>`` and aggregated on
their own, unless ``pool=True``. The same run (equal run id) found in two folders counts once.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bayeslora import ConfigError

from .store import results_table

PROVENANCE = ["source", "suite", "code_version", "hardware"]


def folder_labels(dirs: list[Path]) -> list[str]:
    """Short distinct labels: the folder names, with the parent's name (then a number) where they clash."""
    labels = [d.name or str(d) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{d.parent.name}/{d.name}" if d.parent.name else d.name for d in dirs]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def protocol_key(df: pd.DataFrame) -> pd.Series:
    """The pooling key of each row: its protocol id, or "suite <name>" for rows without one."""
    suite = df["suite"].astype(str) if "suite" in df.columns else pd.Series("?", df.index)
    fallback = "suite " + suite
    if "protocol_id" not in df.columns:
        return fallback
    return df["protocol_id"].where(df["protocol_id"].notna(), fallback).astype(str)


def merged_results(dirs: list[str | Path], pool: bool = False) -> pd.DataFrame:
    """The rows of every folder, with provenance, split by protocol as described in the module docstring."""
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ConfigError("give at least one results folder")
    frames = []
    for i, (folder, label) in enumerate(zip(dirs, folder_labels(dirs), strict=True)):
        df = results_table(folder)
        if df.empty:
            raise FileNotFoundError(f"no finished runs under {folder}/runs; run `bayeslora run SUITE --out {folder}`")
        frames.append(df.assign(source=label, folder=i))
    df = pd.concat(frames, ignore_index=True)
    df = df.drop_duplicates(["run_id", "eval_set"], keep="first").reset_index(drop=True)
    if pool or len(dirs) == 1:
        return df
    key = protocol_key(df)
    protocols = key.groupby([df.model, df.dataset, df.method]).transform("nunique")
    split = protocols > 1
    df.loc[split, "method"] = df.loc[split, "method"] + " @ " + df.loc[split, "source"]
    return df


def provenance_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per folder: its suites, code versions, hardware, protocols and number of runs."""
    if "source" not in df.columns:
        return pd.DataFrame()
    runs = df.drop_duplicates("run_id").assign(protocol=protocol_key(df.drop_duplicates("run_id")))
    rows = []
    for source, part in runs.groupby("source", sort=False):
        row = {"folder": source, "runs": len(part)}
        for col in ("suite", "code_version", "hardware"):
            values = sorted({str(v) for v in part[col].dropna()}) if col in part.columns else []
            row[col] = ", ".join(values) or "?"
        row["protocols"] = part["protocol"].nunique()
        rows.append(row)
    return pd.DataFrame(rows)
