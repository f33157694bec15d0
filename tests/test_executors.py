"""Distributed executors: the smoke suite on a local Ray cluster equals the local loop; dead workers are retried."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from bayeslora import ConfigError
from benchmarks.cli import main as cli_main
from benchmarks.executors import (
    HELD,
    LocalExecutor,
    RayExecutor,
    RunsFailed,
    RunTask,
    SlurmExecutor,
    dispatch,
    make_executor,
)

REPO = Path(__file__).parents[1]
SMOKE = str(REPO / "configs/suites/smoke.yaml")
METRICS = ["acc", "ece", "nll", "brier", "entropy", "mi", "aurc"]

ray = pytest.importorskip("ray")
pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _die_once(marker_dir: str):
    """A task body that kills its own worker process on the first attempt of each item."""
    def body(item: int) -> int:
        marker = Path(marker_dir) / f"attempt-{item}"
        if item == 1 and not marker.exists():
            marker.write_text("died")
            os._exit(1)  # the worker process dies, as on an out-of-memory kill or a lost node
        return item * 10
    return body


def test_ray_retries_a_run_whose_worker_died(ray_cluster, tmp_path):
    results = RayExecutor(retries=1).map(_die_once(str(tmp_path)), [0, 1, 2])
    assert results == [0, 10, 20] and (tmp_path / "attempt-1").exists()
    no_retry = RayExecutor(retries=0).map(_die_once(str(tmp_path / "again")), [1, 2])
    assert isinstance(no_retry[0], Exception) and no_retry[1] == 20  # the other run is unaffected


def test_slurm_executor_resubmits_a_failed_job_with_submitit_local(tmp_path):
    executor = SlurmExecutor(folder=str(tmp_path / "jobs"), cluster="local", parameters={"timeout_min": 5})
    assert executor.map(_die_once(str(tmp_path)), [0, 1]) == [0, 10]


def test_failed_runs_are_named_after_the_others_finish(tmp_path):
    class Flaky:
        def map(self, fn, items):
            return [ValueError("boom") if t.run_id == "b" else t.run_id for t in items]

    tasks = [RunTask({}, "s", str(tmp_path), rid) for rid in ("a", "b")]
    with pytest.raises(RunsFailed, match=r"(?s)1 of 2 runs failed.*title b \(b\): ValueError: boom"):
        dispatch(Flaky(), str, tasks, {"a": "title a", "b": "title b"})
    with pytest.raises(ConfigError, match="executor must be one of"):
        make_executor("dask", tmp_path)


@pytest.mark.integration
def test_smoke_suite_on_ray_equals_the_local_loop(ray_cluster, tmp_path):
    subset = ["--set", "methods=[zero_shot, map, mc_dropout]"]
    assert cli_main(["run", SMOKE, "--out", str(tmp_path / "local"), *subset]) == 0
    assert cli_main(["run", SMOKE, "--out", str(tmp_path / "ray"), "--executor", "ray", *subset]) == 0
    key = ["run_id", "eval_set"]
    local = pd.read_csv(tmp_path / "local" / "results.csv").sort_values(key).reset_index(drop=True)
    remote = pd.read_csv(tmp_path / "ray" / "results.csv").sort_values(key).reset_index(drop=True)
    assert list(local.run_id) == list(remote.run_id) and len(local) == 6
    # Ray workers run with one thread, the local loop with two: the same numbers up to float rounding
    pd.testing.assert_frame_equal(local[METRICS], remote[METRICS], rtol=1e-5, atol=1e-6)
    assert (remote.n_examples == local.n_examples).all()
    assert cli_main(["run", SMOKE, "--out", str(tmp_path / "ray"), "--executor", "ray", *subset]) == 0  # resumes


def test_local_executor_defers_held_runs_and_retries_them_waiting(tmp_path):
    calls = []

    def fn(task):
        calls.append((task.run_id, task.wait))
        return HELD if task.run_id == "b" and not task.wait else task.run_id

    tasks = [RunTask({}, "s", str(tmp_path), rid, wait=False) for rid in ("a", "b", "c")]
    assert dispatch(LocalExecutor(), fn, tasks, {t.run_id: t.run_id for t in tasks}) == ["a", "b", "c"]
    assert calls == [("a", False), ("b", False), ("c", False), ("b", True)]
    assert isinstance(make_executor("local", tmp_path), LocalExecutor)
    with pytest.raises(ConfigError, match="local executor takes no options"):
        make_executor("local", tmp_path, {"num_gpus": 1})
