"""Executes a suite: each run fits one posterior and predicts its test and OOD sets.

Output layout (every run written atomically: a temporary folder renamed into place)::

    OUT/runs/<run-id>/config.yaml          the resolved configuration (run-id = its hash)
    OUT/runs/<run-id>/predictive.pt        in-distribution test set: logits (N,S,K), labels, example_ids
    OUT/runs/<run-id>/predictive-<set>.pt  each OOD evaluation set
    OUT/runs/<run-id>/metrics.json         one row per evaluation set
    OUT/runs/<run-id>/posterior.pt         the fitted posterior's state (methods with ``saves_state``)
    OUT/runs/<run-id>/path.csv             loss/acc along weight-space paths (suite ``path:``, see bayeslora.paths)
    OUT/runs/<run-id>/log.txt              the run's log (INFO level, whatever the console shows)
    OUT/runs/.locks/<run-id>.lock          held (flock) by the process executing the run
    OUT/cache/                             shared artifacts (MAP adapters, trunk hidden states, ...)
    OUT/results.csv, OUT/results.parquet   every finished run's rows (runs of this suite only)
    OUT/manifest.json                      the suite's run ids and titles (older runs' folders stay, out of results)
    OUT/suite.yaml                         the suite as run (a differing file the tool did not write is never replaced)

A run whose folder holds an intact metrics.json (its recorded files present at their recorded sizes)
is skipped, so an interrupted suite resumes where it stopped; a damaged one is redone. Several
processes may execute one suite into one folder at once: each run is claimed with an exclusive lock,
executed by one process only, and the others wait for the runs they could not claim. Each run's rows
carry its per-phase profile (``time_<phase>`` columns, exclusive seconds) and the code it came from.

Costs: ``fit_seconds`` and ``predict_seconds`` (per evaluation set) are timed here for every method
alike, without the time spent filling shared caches, which is charged to the cache instead
(``cache_<trunk|features|map_adapter>_seconds``: what this run happened to fill); ``shared_train_seconds``
is the training time of the cached MAP adapters the run builds on, the same whether it trained or loaded them.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bayeslora import ConfigError, Posterior, Predictive, distributed, get_method
from bayeslora.artifacts import ArtifactStore, content_hash
from bayeslora.backbone import Backbone, load_backbone
from bayeslora.config import DataSettings, ModelSettings, to_plain
from bayeslora.data import EncodedSplit, TaskSplits, get_task, load_task_splits, make_loader
from bayeslora.files import TEMP_MARK, atomic_write_text, remove_orphans, temp_prefix
from bayeslora.identity import code_version
from bayeslora.metrics import LABEL_METRICS, classification_metrics, ood_metrics
from bayeslora.paths import PathSettings, barrier_columns, evaluate_paths
from bayeslora.profiling import CACHES, PHASES, PhaseProfile, own_seconds, peak_memory_window, phase, recording
from bayeslora.trunk import TrunkCache

from .executors import HELD, Executor, LocalExecutor, RunTask, dispatch
from .store import METRICS, describe_files, read_run, stale_runs, write_manifest, write_results
from .suite import RunSpec, Suite, has_paths, parse_suite

log = logging.getLogger("bayeslora.runner")


def checkpointing_for(posterior: Posterior, backbone: Backbone) -> contextlib.AbstractContextManager[Any]:
    """The model's gradient checkpointing, paused for a method that cannot replay its forward."""
    if posterior.supports_gradient_checkpointing or not backbone.gradient_checkpointing_active:
        return contextlib.nullcontext()
    log.info("%s trains without gradient checkpointing (see Posterior.supports_gradient_checkpointing)",
             posterior.name)
    return backbone.gradient_checkpointing_paused()


@dataclass
class TaskData:
    train: EncodedSplit
    val: EncodedSplit
    test: EncodedSplit
    protocol: str


class DataCache:
    """Examples per (dataset, data settings) and tokenised splits per (tokenizer, dataset, data settings,
    max_length), each built once per process."""

    def __init__(self) -> None:
        self._cache: dict[str, TaskData] = {}
        self._splits: dict[str, TaskSplits] = {}

    def splits(self, dataset: str, data: DataSettings) -> TaskSplits:
        """The examples (read and checked, not tokenised): bad data files fail here, before a model loads."""
        key = content_hash([dataset, to_plain(data)])
        if key not in self._splits:
            self._splits[key] = load_task_splits(get_task(dataset), data)
        return self._splits[key]

    def get(self, backbone: Backbone, dataset: str, data: DataSettings) -> TaskData:
        key = content_hash([backbone.model_id, dataset, to_plain(data), backbone.settings.max_length])
        if key not in self._cache:
            splits = self.splits(dataset, data)
            enc = lambda ex, part: EncodedSplit(ex, backbone.tokenizer, backbone.settings.max_length,
                                                f"{dataset}/{part}")
            self._cache[key] = TaskData(enc(splits.train, "train"), enc(splits.val, "val"), enc(splits.test, "test"),
                                        splits.protocol)
        return self._cache[key]


def trunk_cache_file(out: Path, trunk: TrunkCache) -> Path:
    """Where a results folder keeps the trunk cache's hidden states across processes."""
    return out / "cache" / "trunk" / f"{trunk.fingerprint}.pt"


def run_path_analysis(posterior: Posterior, backbone: Backbone, task: TaskData, settings: PathSettings) -> Any:
    """The posterior's weight-space paths evaluated on the task's splits (a pandas table, see bayeslora.paths)."""
    if not has_paths(type(posterior)):
        raise ConfigError(f"method {posterior.name!r} has no weight-space paths to analyse (it defines no paths()); "
                          f"path analysis applies to methods such as lora_curve")
    return evaluate_paths(backbone, posterior.paths(), {s: getattr(task, s) for s in settings.splits}, settings)


SUITE_FILE = "suite.yaml"
SUITE_HEADER = "# The suite as `bayeslora run` last ran it into this folder (rewritten by each run).\n"
LOCKS = ".locks"


def prepare_out_dir(out: Path) -> None:
    """Create OUT (a file there is a user error) and its runs folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the results (it is created if missing)")
    (out / "runs").mkdir(parents=True, exist_ok=True)


def record_suite(out: Path, raw: dict[str, Any]) -> None:
    """Write the suite as run to OUT/suite.yaml. A file there that the tool did not write is kept when it
    holds the same suite (comments and all), and refused when it differs: it is never overwritten."""
    path = out / SUITE_FILE
    text = SUITE_HEADER + yaml.safe_dump(raw, sort_keys=False)
    if path.exists():
        current = path.read_text(errors="replace")
        if current == text:
            return
        if not current.startswith(SUITE_HEADER):
            try:
                same = yaml.safe_load(current) == raw
            except yaml.YAMLError:
                same = False
            if same:
                return
            raise ConfigError(f"{path} is a file bayeslora did not write, and it differs from the suite being run; "
                              f"the runner records the suite it runs there. Move your file out of {out}, or pass "
                              f"another --out")
    atomic_write_text(path, text)


class RunLock:
    """An exclusive lock on one run (``flock`` on OUT/runs/.locks/<run-id>.lock): the operating system
    releases it when its holder exits or dies, so a killed process never blocks a run."""

    def __init__(self, out: Path, run_id: str):
        self.path = out / "runs" / LOCKS / f"{run_id}.lock"
        self._fd: int | None = None

    def acquire(self, block: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """The run's INFO log in ``path`` whatever the console shows: bayeslora's loggers pass INFO records
    for the duration (handlers of the console keep their own levels)."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    lowered = [lg for lg in map(logging.getLogger, ("bayeslora", "baselines", "benchmarks"))
               if lg.getEffectiveLevel() > logging.INFO]
    for lg in lowered:
        lg.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for lg in lowered:
            lg.setLevel(logging.NOTSET)


def method_code_label(spec: RunSpec) -> str:
    """``<distribution> <version> <source digest>`` of the run's method, for its results rows."""
    code = spec.inputs.get("code", {}).get("method", {})
    return " ".join(str(code.get(k, "")) for k in ("distribution", "version", "source")).strip()


class Runner:
    """Runs a suite's runs in order on the local machine, skipping finished ones.

    ``rerun``: method labels or names (or "all") whose runs execute again although finished, with the
    shared artifact cache bypassed for them (MAP adapters and features are recomputed and rewritten)."""

    def __init__(self, suite: Suite, out_dir: str | Path, progress: bool = True, rerun: list[str] | None = None):
        self.suite = suite
        self.out = Path(out_dir)
        self.progress = progress
        self.rerun = set(rerun or [])
        known = {s.method.label for s in suite.runs} | {s.method.name for s in suite.runs} | {"all"}
        unknown = sorted(self.rerun - known)
        if unknown:
            raise ConfigError(f"--rerun {', '.join(unknown)}: not a method of suite {suite.name!r}; give a method "
                              f"label or name ({', '.join(sorted(known - {'all'}))}) or all")
        self.artifacts = ArtifactStore(self.out / "cache")
        self.data = DataCache()
        self._backbone: Backbone | None = None
        self._backbone_key: str | None = None
        self._trunk_files_loaded: set[Path] = set()
        self._forced_done: set[str] = set()
        self._positions: dict[str, str] = {}

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.run_id

    def forced(self, spec: RunSpec) -> bool:
        """Whether ``--rerun`` asks for this run (once per Runner: a rerun run is then finished)."""
        return bool(self.rerun & {"all", spec.method.label, spec.method.name}) and spec.run_id not in self._forced_done

    def is_done(self, spec: RunSpec) -> bool:
        """Finished and intact (see :func:`benchmarks.store.read_run`), and not asked to rerun."""
        if self.forced(spec):
            return False
        record, why = read_run(self.run_dir(spec))
        if record is None and (self.run_dir(spec) / METRICS).exists():
            log.warning("run folder %s is damaged (%s); it runs again", self.run_dir(spec), why)
        return record is not None

    def backbone(self, settings: ModelSettings) -> Backbone:
        key = content_hash({k: v for k, v in to_plain(settings).items() if k != "trunk_cache"})
        if key != self._backbone_key:
            self._backbone = None
            gc.collect()
            self._backbone = load_backbone(settings)
            self._backbone_key = key
        return self._backbone

    def spec(self, run_id: str) -> RunSpec:
        for spec in self.suite.runs:
            if spec.run_id == run_id:
                return spec
        raise ConfigError(f"run {run_id} is not in suite {self.suite.name!r} (its settings may have changed)")

    def check_data(self, specs: list[RunSpec]) -> None:
        """Read every dataset and OOD set the runs need (errors name the file and row) before a model loads."""
        for spec in specs:
            for name in [spec.dataset.name, *spec.dataset.ood]:
                self.data.splits(name, spec.data)

    def prepare(self) -> None:
        """OUT's layout, the suite record and manifest, and the removal of what killed processes left."""
        prepare_out_dir(self.out)
        record_suite(self.out, self.suite.raw)
        write_manifest(self.out, self.suite.name, {s.run_id: s.title for s in self.suite.runs})
        for folder in (self.out, self.out / "runs"):
            remove_orphans(folder)
        self.artifacts.remove_orphans()
        stale = stale_runs(self.out)
        if stale:
            log.warning("%d finished run folders under %s/runs are not in this suite (its settings, data, weights "
                        "or code changed); they stay on disk but are left out of results.csv", len(stale), self.out)

    def run(self, executor: Executor | None = None) -> list[str]:
        """Run every unfinished run through ``executor`` (default :class:`~benchmarks.executors.LocalExecutor`:
        here, one after another); returns the ids executed now."""
        main = distributed.is_main_process()  # under data parallelism only the main process writes
        if main:
            self.prepare()
        distributed.barrier()
        todo = [s for s in self.suite.runs if not self.is_done(s)]
        log.info("%d runs in suite %s, %d already finished", len(self.suite.runs), self.suite.name,
                 len(self.suite.runs) - len(todo))
        self.check_data(todo)
        if distributed.world_size() > 1:  # every process computes every run together: no claiming
            return self._run_together(todo)
        executor = executor or LocalExecutor()
        tasks = [RunTask(self.suite.raw, self.suite.name, str(self.out), s.run_id,
                         sorted(self.rerun) if self.forced(s) else []) for s in todo]
        self._positions = {s.run_id: f"[{i}/{len(todo)}] {s.title}" for i, s in enumerate(todo, 1)}
        here = getattr(executor, "in_process", False)  # shares this runner's state, or rebuilds one per worker
        if not here:
            print(f"dispatching {len(tasks)} runs to {type(executor).__name__}", flush=True)
        try:
            return dispatch(executor, self.run_here if here else run_one, tasks, {s.run_id: s.title for s in todo})
        finally:
            write_results(self.out)

    def run_here(self, task: RunTask) -> str | None:
        """The local executor's task function: claim and execute one run in this process with this runner's
        state, then rewrite results.csv. Returns the run id when executed here, None when another process
        finished it, :data:`~benchmarks.executors.HELD` when another process holds it and ``task.wait`` is off."""
        spec = self.spec(task.run_id)
        if task.wait:
            print(f"waiting for another process to finish {spec.title}", flush=True)
            self._forced_done.add(spec.run_id)  # what the other process writes is fresh: no second rerun
        else:
            print(self._positions.get(spec.run_id, spec.title), flush=True)
        outcome = self.claim_and_execute(spec, block=task.wait)
        if outcome is None:
            print("    another process is running it; coming back to it at the end", flush=True)
            return HELD
        if outcome:
            write_results(self.out)
            return spec.run_id
        return None

    def _run_together(self, todo: list[RunSpec]) -> list[str]:
        main = distributed.is_main_process()
        for i, spec in enumerate(todo, 1):
            if main:
                print(f"[{i}/{len(todo)}] {spec.title}", flush=True)
            self.execute(spec)
            if main:
                write_results(self.out)
            distributed.barrier()  # every process sees this run finished before the next begins
        return [s.run_id for s in todo]

    def claim_and_execute(self, spec: RunSpec, block: bool) -> bool | None:
        """Execute ``spec`` under its lock: True when executed here, False when it turned out finished (by
        another process), None when another process holds it and ``block`` is off."""
        lock = RunLock(self.out, spec.run_id)
        if not lock.acquire(block):
            return None
        try:
            if self.is_done(spec):
                return False
            for orphan in (self.out / "runs").glob(f"{TEMP_MARK}{spec.run_id}-*"):  # we hold the run: nobody
                shutil.rmtree(orphan, ignore_errors=True)                           # else is writing it
            self.execute(spec)
            return True
        finally:
            lock.release()

    def execute(self, spec: RunSpec) -> None:
        """Fit, predict and evaluate one run into a temporary folder renamed into place (no lock taken)."""
        if not distributed.is_main_process():  # a data-parallel helper: compute the run, write nothing
            with tempfile.TemporaryDirectory() as scratch:
                self._fit_and_evaluate(spec, Path(scratch))
            return
        final = self.run_dir(spec)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(spec.run_id)))
        self.artifacts.refresh = self.forced(spec)
        try:
            (tmp / "config.yaml").write_text(yaml.safe_dump({"run_id": spec.run_id, **spec.resolved(),
                                                             "inputs": spec.inputs}, sort_keys=False))
            with run_log(tmp / "log.txt"):
                rows = self._fit_and_evaluate(spec, tmp)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            (tmp / METRICS).write_text(json.dumps({"run_id": spec.run_id, "rows": rows, "inputs": spec.inputs,
                                                   "files": describe_files(tmp, files)}, indent=1))
            if final.exists():  # a damaged or forced-rerun folder: replaced by the new one
                shutil.rmtree(final)
            os.replace(tmp, final)
            if self.forced(spec):
                self._forced_done.add(spec.run_id)
        finally:
            self.artifacts.refresh = False
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _fit_and_evaluate(self, spec: RunSpec, tmp: Path) -> list[dict[str, Any]]:
        profile = PhaseProfile()
        with recording(profile):
            rows = self._profiled_run(spec, tmp)
        times = {f"time_{p}": round(profile.seconds.get(p, 0.0), 3) for p in PHASES}
        log.info("profile (s): %s", times)
        times.update({f"cache_{c}_seconds": round(profile.cache_seconds.get(c, 0.0), 3) for c in CACHES})
        times["shared_train_seconds"] = round(profile.shared_training_seconds, 3)
        for row in rows:
            row.update(times)
        return rows

    def _profiled_run(self, spec: RunSpec, tmp: Path) -> list[dict[str, Any]]:
        with phase("load"):
            backbone = self.backbone(spec.model)
            trunk = backbone.configure_trunk_cache(spec.model.trunk_cache, spec.lora)
            trunk_file = trunk_cache_file(self.out, trunk) if trunk else None
            if trunk is not None and trunk_file not in self._trunk_files_loaded:
                trunk.load(trunk_file)
                self._trunk_files_loaded.add(trunk_file)
        with phase("tokenise"):
            task = self.data.get(backbone, spec.dataset.name, spec.data)
            ood_tasks = {name: self.data.get(backbone, name, spec.data) for name in spec.dataset.ood}
        posterior: Posterior = get_method(spec.method.name)(spec.method_config, seed=spec.seed,
                                                            artifacts=self.artifacts)
        torch.manual_seed(spec.seed)
        log.info("run %s: %s", spec.run_id, spec.title)
        try:
            with (phase("fit"), checkpointing_for(posterior, backbone), peak_memory_window(backbone.device) as peak,
                  own_seconds() as took):
                report = posterior.fit(backbone, task.train, task.val)
            report.fit_seconds = took[0]  # timed here, for every method alike, shared cache fills excluded
            report.extra["peak_mem_mb"] = peak.mb  # the whole fit: training runs and post-hoc passes
            log.info("fit: %s", report)
            eval_batch = getattr(getattr(spec.method_config, "train", None), "eval_batch_size", 16)
            with phase("predict"):
                predictive = self._predict(posterior, task.test, spec, eval_batch)
                ood_preds = {name: self._predict(posterior, ood.test, spec, eval_batch)
                             for name, ood in ood_tasks.items()}
            if posterior.saves_state:
                torch.save(posterior.state_dict(), tmp / "posterior.pt")
            path_table = None
            if spec.path is not None:
                with phase("path"):
                    path_table = run_path_analysis(posterior, backbone, task, spec.path)
        finally:
            posterior.release()
        with phase("metrics"):
            predictive.save(tmp / "predictive.pt")
            trunk_info = {"trunk_layer": trunk.layer if trunk else None}
            rows = [self._row(spec, report, predictive, spec.dataset.name, task.protocol, task.test.num_classes)]
            for name, ood_pred in ood_preds.items():
                ood_pred.save(tmp / f"predictive-{name}.pt")
                ood = ood_tasks[name]
                row = self._row(spec, report, ood_pred, name, ood.protocol, ood.test.num_classes)
                row.update(ood_metrics(predictive.logits, ood_pred.logits))
                rows.append(row)
            if path_table is not None:
                path_table.to_csv(tmp / "path.csv", index=False)
                trunk_info.update(barrier_columns(path_table))
            for row in rows:
                row.update(trunk_info)
            if trunk is not None:
                log.info("trunk cache: %s", trunk.stats())
        if trunk is not None and distributed.is_main_process():
            with phase("trunk"):
                trunk.save(trunk_file)
        return rows

    def _predict(self, posterior: Posterior, split: EncodedSplit, spec: RunSpec, batch_size: int) -> Predictive:
        """The posterior's predictive; its ``cost.wall_seconds`` timed here (shared cache fills excluded)."""
        with own_seconds() as took:
            predictive = posterior.predict(make_loader(split, batch_size), spec.num_samples)
        predictive.cost.wall_seconds = took[0]
        if posterior.deterministic and predictive.num_samples != 1:
            raise RuntimeError(f"{spec.method.name} is deterministic but returned S={predictive.num_samples}")
        return predictive

    def _row(self, spec: RunSpec, report: Any, pred: Predictive, eval_set: str, protocol: str,
             num_classes: int) -> dict[str, Any]:
        row: dict[str, Any] = {
            "model": spec.model.name, "method": spec.method.label, "method_name": spec.method.name,
            "dataset": spec.dataset.name, "eval_set": eval_set, "split": "test", "seed": spec.seed,
            "num_samples": pred.num_samples, "n_examples": len(pred.labels),
        }
        row.update(classification_metrics(pred.logits, pred.labels, n_bins=spec.n_bins))
        if not get_task(eval_set).labelled:  # an OOD detection set: only label-free numbers mean anything
            for metric in LABEL_METRICS:
                row[metric], row[f"{metric}_na"] = float("nan"), f"{eval_set} has no labels (OOD detection only)"
        row.update({
            "fit_seconds": report.fit_seconds, "predict_seconds": pred.cost.wall_seconds,
            "peak_mem_mb": pred.cost.peak_mem_mb, "trainable_params": report.trainable_params,
            "posterior_params": report.posterior_params, "forward_passes": pred.cost.forward_passes,
            "reused_cache": report.reused_cache,
            "template": get_task(eval_set).template, "protocol": protocol, "n_bins": spec.n_bins,
            "k_policy": f"per-question options, K={num_classes}", "suite": spec.suite, "run_id": spec.run_id,
            "code_version": code_version(), "method_code": method_code_label(spec),
            "protocol_id": spec.protocol_id, "hardware": hardware_label(),
        })
        row.update({f"fit_{k}": v for k, v in report.extra.items() if isinstance(v, int | float | str)})
        return row


def hardware_label() -> str:
    """What the run ran on, for results rows: the accelerator model and count, or the CPU's core count
    and architecture (no host names)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.machine() or 'unknown'}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


_WORKER_RUNNERS: dict[tuple[str, str], Runner] = {}


def run_one(task: RunTask) -> str | None:
    """Execute one run of a suite in this (worker) process under the run's lock, unless it is finished;
    returns its id when executed, None when it was finished. A worker keeps one Runner per (folder, suite),
    so the backbone stays loaded across runs."""
    key = (task.out, content_hash(task.suite_raw))
    if key not in _WORKER_RUNNERS:
        _WORKER_RUNNERS.clear()  # one suite per worker at a time: free the previous backbone
        _WORKER_RUNNERS[key] = Runner(parse_suite(task.suite_raw, default_name=task.suite_name), task.out,
                                      progress=False)
    runner = _WORKER_RUNNERS[key]
    runner.rerun = set(task.rerun)
    return task.run_id if runner.claim_and_execute(runner.spec(task.run_id), block=True) else None
