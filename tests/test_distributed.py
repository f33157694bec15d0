"""Data-parallel training (accelerate process group): 2 CPU processes (gloo) = 1 process accumulating 2 batches."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from bayeslora import distributed
from benchmarks.cli import main as cli_main

from .conftest import tiny_model_settings

METRICS = ["acc", "ece", "nll", "brier"]


def test_each_process_takes_every_nth_batch_and_the_groups_epoch(monkeypatch):
    pairs = [(0.25 * (i + 1), f"b{i}") for i in range(10)]
    assert distributed.world_size() == 1 and distributed.is_main_process()  # one process: no-ops
    assert list(distributed.shard_batches(pairs)) == pairs
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    # groups (b0 b1 b2), (b3 b4 b5), (b6 b7 b8); b9 is dropped; the epoch is each group's last
    assert list(distributed.shard_batches(pairs)) == [(0.75, "b1"), (1.5, "b4"), (2.25, "b7")]


def _suite(tmp_path) -> str:
    suite = {
        "name": "dp", "num_samples": 1, "seeds": [0],
        "model": {**tiny_model_settings("llama"), "device": "cpu"},
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},  # no dropout: both runs draw no random masks
        "train": {"epochs": 2, "lr": 1e-2, "batch_size": 4, "progress": False, "warmup_ratio": 0.0},
        "data": {"max_train": 16, "max_val": 8, "max_test": 12},
        "datasets": ["sst2"],
        "methods": ["map"],
    }
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


@pytest.mark.integration
def test_two_process_data_parallel_equals_one_process_with_two_step_accumulation(tmp_path):
    suite = _suite(tmp_path)
    assert cli_main(["run", suite, "--out", str(tmp_path / "one"), "--set", "train.grad_accum=2"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # torchrun starts the 2 processes (accelerate launch needs mpirun for CPU-only runs); accelerate's
    # PartialState then sets up the gloo process group in each
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "benchmarks.cli",
              "run", suite, "--out", str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = pd.read_csv(tmp_path / "one" / "results.csv")
    two = pd.read_csv(tmp_path / "two" / "results.csv")
    assert len(one) == len(two) == 1
    pd.testing.assert_frame_equal(one[METRICS], two[METRICS], rtol=1e-4, atol=1e-5)
    assert one["fit_best_val_nll"].iloc[0] == pytest.approx(two["fit_best_val_nll"].iloc[0], rel=1e-4)
    assert not list((tmp_path / "two" / "runs").glob(".tmp-*"))  # the helper process wrote nothing
