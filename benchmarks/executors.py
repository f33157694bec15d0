"""Where a suite's runs execute: this process (:class:`LocalExecutor`), a Ray cluster, or Slurm through submitit.

Every executor has one method, ``map(fn, tasks)``: it calls ``fn`` on each :class:`RunTask` somewhere and
returns one result per task (an exception for a task that failed). The runner hands in the function (this
module imports no runner code) and reads the results with :func:`dispatch`.

The local executor runs the tasks in order in this process with the runner's own state (the loaded
backbone, the data cache). A run that another process holds (its function returns :data:`HELD`) is put
aside and tried again, waiting for its lock, after all the others; a run that raises stops the suite
(finished runs are kept, and the same command resumes).

A distributed executor sends each unfinished run to :func:`benchmarks.runner.run_one`, which rebuilds
the suite from its resolved mapping inside the worker and executes that one run with a
:class:`~benchmarks.runner.Runner` writing into the same output folder. The layout is unchanged: every
run folder is written to a temporary name and renamed into place, MAP adapters and other artifacts are atomic files in
``OUT/cache`` shared by all workers (two workers that need the same MAP adapter at once may both train
it; the results are identical), and the trunk cache's hidden states are saved per worker (the last
writer wins; a lost entry is only recomputed). A run whose worker dies is retried up to ``retries``
times; the other runs go on. A run that raises is reported at the end with its run id and log, after
every other run has finished.

Ray: ``ray.init`` on ``address`` (None starts a local cluster), one task per run with ``num_cpus``
and ``num_gpus`` each and ``max_retries = retries``. Slurm: ``submitit.AutoExecutor`` with
``cluster`` (None: Slurm when available; ``local`` runs the jobs as local processes, as the tests do)
and ``parameters`` passed to ``update_parameters`` (e.g. ``slurm_partition``, ``gpus_per_node``,
``timeout_min``); a job that fails is resubmitted up to ``retries`` times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bayeslora import BayesLoraError, ConfigError

log = logging.getLogger("bayeslora.executors")

EXECUTORS = ("local", "ray", "slurm")

HELD = "held by another process"
"""What a task function returns when another process holds the run and the task does not ``wait``."""

class RunsFailed(BayesLoraError):
    """Some runs of a distributed suite failed; the others finished and are in the results."""


@dataclass(frozen=True)
class RunTask:
    """What a worker needs to execute one run: the resolved suite mapping, its name, the folder, the id."""

    suite_raw: dict[str, Any]
    suite_name: str
    out: str
    run_id: str
    rerun: list[str] = field(default_factory=list)
    """``--rerun`` values that apply to this run (it executes again although finished)."""
    wait: bool = True
    """Wait for the run's lock when another process holds it (off: the function returns :data:`HELD`)."""


@dataclass
class LocalExecutor:
    """Every task in this process, in order; tasks held by another process are retried, waiting, at the end.

    ``in_process``: the runner hands in its own bound function (sharing its loaded backbone) rather than
    the worker entry point that rebuilds a runner from the task."""

    in_process: bool = True

    def map(self, fn: Callable[[RunTask], Any], items: Sequence[RunTask]) -> list[Any]:
        results = [fn(replace(item, wait=False)) for item in items]
        for i, item in enumerate(items):
            if results[i] == HELD:
                results[i] = fn(replace(item, wait=True))
        return results


@dataclass
class RayExecutor:
    """One Ray task per run."""

    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    retries: int = 2

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any | BaseException]:
        """fn(item) for every item; an item whose task failed (after retries) gives its exception."""
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--executor ray needs Ray: pip install 'bayeslora[distributed]'") from exc
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.retries)(fn)
        refs = [remote.remote(item) for item in items]
        results: list[Any | BaseException] = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, the others go on
                results.append(exc)
        return results


@dataclass
class SlurmExecutor:
    """One submitit job per run; failed jobs are resubmitted up to ``retries`` times."""

    folder: str
    cluster: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    retries: int = 2

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any | BaseException]:
        try:
            import submitit
        except ImportError as exc:
            raise ConfigError("--executor slurm needs submitit: pip install 'bayeslora[distributed]'") from exc
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(**self.parameters)
        jobs = {i: executor.submit(fn, item) for i, item in enumerate(items)}
        results: dict[int, Any | BaseException] = {}
        attempts = dict.fromkeys(jobs, 0)
        while jobs:
            for i, job in list(jobs.items()):
                try:
                    results[i] = job.result()
                    del jobs[i]
                except Exception as exc:  # noqa: BLE001 - resubmit, or report after the last attempt
                    if attempts[i] < self.retries:
                        attempts[i] += 1
                        log.warning("job for item %d failed (%s); resubmitting (%d/%d)", i, exc, attempts[i],
                                    self.retries)
                        jobs[i] = executor.submit(fn, items[i])
                    else:
                        results[i] = exc
                        del jobs[i]
        return [results[i] for i in range(len(items))]


Executor = LocalExecutor | RayExecutor | SlurmExecutor


def make_executor(name: str, out: str | Path, options: dict[str, Any] | None = None) -> Executor:
    """An executor by name; ``options`` are its dataclass fields (e.g. address, num_gpus, cluster)."""
    options = dict(options or {})
    if name == "local":
        if options:
            raise ConfigError(f"--executor-option {', '.join(sorted(options))}: the local executor takes no options")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    if name == "slurm":
        options.setdefault("folder", str(Path(out) / "slurm"))
        return SlurmExecutor(**options)
    raise ConfigError(f"executor must be one of {EXECUTORS}, got {name!r}")


def dispatch(executor: Executor, fn: Callable[[RunTask], str | None], tasks: list[RunTask],
             titles: dict[str, str]) -> list[str]:
    """``fn`` on every task through ``executor``; returns the ids of the runs executed (``fn`` returns a run id
    when it executed the run, None when it found it finished), or raises :class:`RunsFailed` naming the
    failed runs after the others finished."""
    results = executor.map(fn, tasks)
    failed = [(task, res) for task, res in zip(tasks, results, strict=True) if isinstance(res, BaseException)]
    if failed:
        lines = [f"  {titles[t.run_id]} ({t.run_id}): {type(e).__name__}: {e}" for t, e in failed]
        raise RunsFailed(f"{len(failed)} of {len(tasks)} runs failed (the others finished; run the same command "
                         f"again to retry only these):\n" + "\n".join(lines))
    return [res for res in results if isinstance(res, str) and res != HELD]
