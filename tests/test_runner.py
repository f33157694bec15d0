import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bayeslora import ConfigError
from bayeslora.paths import PATH_COLUMNS
from benchmarks.cli import main as cli_main
from benchmarks.leaderboard import aggregate
from benchmarks.runner import Runner
from benchmarks.suite import apply_overrides, load_suite, parse_suite

from .conftest import tiny_model_settings
from .plugin_fixture import install_plugin

REPO = Path(__file__).parents[1]
REQUIRED_COLUMNS = ["model", "method", "dataset", "eval_set", "split", "seed", "num_samples", "n_examples", "acc",
                    "ece", "nll", "brier", "entropy", "mi", "fit_seconds", "predict_seconds", "fit_peak_mem_mb",
                    "peak_mem_mb", "trainable_params"]


def tiny_suite(**changes):
    suite = {
        "name": "tiny", "num_samples": 3, "seeds": [0, 1],
        "model": tiny_model_settings("llama"),
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "progress": False},
        "data": {"max_train": 16, "max_val": 8, "max_test": 12},
        "datasets": [{"name": "sst2", "ood": ["boolq"]}],
        "methods": ["zero_shot", "map"],
    }
    suite.update(changes)
    return suite


pytestmark = pytest.mark.integration  # reads the bundled datasets and tokenizer


def test_runner_writes_layout_results_and_resumes(tmp_path):
    runner = Runner(parse_suite(tiny_suite()), tmp_path)
    assert len(runner.run()) == 4
    df = pd.read_csv(tmp_path / "results.csv")
    assert set(REQUIRED_COLUMNS) <= set(df.columns) and (tmp_path / "results.parquet").exists()
    assert len(df) == 4 * 2 and set(df.eval_set) == {"sst2", "boolq"}
    ood = df[df.eval_set == "boolq"]
    assert ood.ood_auroc_entropy.notna().all()
    # zero_shot and map predict with S = 1: MI is 0 everywhere, so its AUROC is n/a with the reason
    assert ood.ood_auroc_mi.isna().all() and ood.ood_auroc_mi_na.str.contains("float noise").all()
    run_dir = tmp_path / "runs" / df.run_id.iloc[0]
    pred = torch.load(run_dir / "predictive.pt")
    assert pred["logits"].dtype == torch.float32 and pred["logits"].ndim == 3 and pred["labels"].dtype == torch.int64
    assert len(pred["example_ids"]) == pred["logits"].shape[0] == 12
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_id"] == run_dir.name
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["suite"] == "tiny" and sorted(manifest["run_ids"]) == sorted(df.run_id.unique())
    # the MAP adapter was trained once per seed and cached
    assert len(list((tmp_path / "cache" / "map_adapter").glob("*.pt"))) == 2
    # a second invocation finds everything done
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/metrics.json")}
    assert Runner(parse_suite(tiny_suite()), tmp_path).run() == []
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/metrics.json")}


def test_new_method_reuses_cached_map_adapter(tmp_path):
    Runner(parse_suite(tiny_suite(methods=["map"], seeds=[0])), tmp_path).run()
    Runner(parse_suite(tiny_suite(methods=["map", {"name": "map", "label": "map-again"}], seeds=[0])),
           tmp_path).run()
    df = pd.read_csv(tmp_path / "results.csv")
    assert df.set_index("method").loc["map-again", "reused_cache"].all()
    # a changed suite setting gives new run ids; the old runs stay on disk but leave the results
    Runner(parse_suite(tiny_suite(methods=["map"], seeds=[0], num_samples=2)), tmp_path).run()
    df = pd.read_csv(tmp_path / "results.csv")
    assert set(df.method) == {"map"} and len(df.run_id.unique()) == 1
    assert len(list(tmp_path.glob("runs/*/metrics.json"))) == 3


def test_leaderboard_cli_aggregates_over_seeds(tmp_path, capsys):
    Runner(parse_suite(tiny_suite(methods=["map"])), tmp_path).run()
    assert cli_main(["leaderboard", str(tmp_path)]) == 0
    assert "± " in capsys.readouterr().out
    board = pd.read_csv(tmp_path / "leaderboard.csv")
    df = pd.read_csv(tmp_path / "results.csv")
    sst = df[df.eval_set == "sst2"]
    row = board[board.eval_set == "sst2"].iloc[0]
    assert row.n_seeds == 2
    assert row.acc_mean == pytest.approx(sst.acc.mean()) and row.nll_std == pytest.approx(sst.nll.std(ddof=1))
    # two metric tables (sst2, boolq) and the per-phase profile: map's 2 runs, once each
    assert (tmp_path / "leaderboard.md").read_text().count("| map |") == 3
    profile = pd.read_csv(tmp_path / "profile.csv").set_index("method")
    assert profile.loc["map", "runs"] == 2 and profile.loc["all methods", "total"] > 0
    assert aggregate(df).shape[0] == 2


def test_trunk_cache_runs_profile_and_match_the_full_forward(tmp_path, capsys):
    suite = tiny_suite(model=tiny_model_settings("qwen2", num_hidden_layers=4), seeds=[0],
                       lora={"r": 2, "alpha": 4, "dropout": 0.1, "layers": {"top": 2}},
                       methods=["zero_shot", "map", "temperature", {"name": "mc_dropout"},
                                {"name": "ensemble", "config": {"members": 2}}])
    off, on = tmp_path / "off", tmp_path / "on"
    Runner(parse_suite(apply_overrides(suite, ["model.trunk_cache=off"])), off).run()
    Runner(parse_suite(suite), on).run()
    a, b = (pd.read_csv(d / "results.csv").sort_values(["method", "eval_set"]) for d in (off, on))
    assert a.trunk_layer.isna().all() and (b.trunk_layer == 2).all()
    for col in ("acc", "nll", "ece", "mi"):
        assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), abs=1e-4), col
    assert (b.time_trunk > 0).any() and (a.time_trunk == 0).all() and (b.time_predict > 0).all()
    assert len(list((on / "cache" / "trunk").glob("*.pt"))) == 1
    assert cli_main(["leaderboard", str(on)]) == 0
    assert "Where the time went" in (on / "leaderboard.md").read_text()
    capsys.readouterr()
    assert cli_main(["profile", str(off), str(on)]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "| trunk |" in table and "| total |" in table


def test_curve_runs_write_paths_and_reload_from_their_folder(tmp_path, capsys):
    suite = tiny_suite(seeds=[0], datasets=["sst2"], path={"points": 5, "max_examples": 8, "methods": ["curve"]},
                       methods=[{"name": "map", "seeds": [0, 1]},
                                {"name": "lora_curve", "label": "curve", "config": {"anchors": 2}},
                                {"name": "lora_curve", "label": "curve-nojs", "config": {"anchors": 2,
                                                                                         "js_weight": 0.0}}])
    Runner(parse_suite(suite), tmp_path).run()
    results = pd.read_csv(tmp_path / "results.csv")
    # the anchors are MAP seeds 0 and 1: the curve trained seed 1's adapter once, MAP seed 1 reused it
    assert results.query("method == 'map' and seed == 1").reused_cache.all()
    df = results.query("seed == 0").set_index("method")
    assert df.loc["curve", "num_samples"] == 3
    assert pd.isna(df.loc["curve-nojs", "barrier_curve_0-1_test"])  # not listed in path.methods: no analysis
    run_dir = tmp_path / "runs" / df.loc["curve", "run_id"]
    table = pd.read_csv(run_dir / "path.csv")
    assert list(table.columns) == PATH_COLUMNS
    assert len(table) == 2 * 5 * 2 and set(table.n_examples) == {8}  # curve_0-1 and line_0-1, 5 t, 2 splits
    for name in ("barrier_line_0-1_train", "barrier_line_0-1_test", "barrier_curve_0-1_train",
                 "barrier_curve_0-1_test"):
        assert np.isfinite(df.loc["curve", name])
    assert df.loc["curve", "time_path"] > 0 and (run_dir / "posterior.pt").exists()
    assert not (tmp_path / "runs" / df.loc["map", "run_id"] / "posterior.pt").exists()
    # `bayeslora path` reloads the fitted curve from the folder and reproduces the table
    (run_dir / "path.csv").unlink()
    assert cli_main(["path", str(run_dir), "--points", "5", "--max-examples", "8"]) == 0
    assert "barrier_interp" in capsys.readouterr().out
    again = pd.read_csv(run_dir / "path.csv")
    assert again[["loss", "acc"]].to_numpy() == pytest.approx(table[["loss", "acc"]].to_numpy(), abs=1e-6)
    map_dir = tmp_path / "runs" / df.loc["map", "run_id"]
    assert cli_main(["path", str(map_dir)]) == 2
    assert "no posterior.pt" in capsys.readouterr().err


def test_path_suite_settings_are_checked():
    with pytest.raises(ConfigError, match="path.methods"):
        parse_suite(tiny_suite(path={"methods": ["nope"]}))
    with pytest.raises(ConfigError, match="no weight-space paths"):
        parse_suite(tiny_suite(path={"methods": ["map"]}))
    with pytest.raises(ConfigError, match="unknown key"):
        parse_suite(tiny_suite(path={"point": 3}))
    with pytest.raises(ConfigError, match="path.datasets"):
        parse_suite(tiny_suite(path={"datasets": ["boolq"]}))
    two = tiny_suite(methods=["lora_curve"], datasets=["sst2", "boolq"], path={"datasets": ["boolq"]})
    assert {r.dataset.name: r.path is not None for r in parse_suite(two).runs} == {"sst2": False, "boolq": True}
    runs = parse_suite(tiny_suite(methods=["map", "lora_curve"], path={"points": 3})).runs
    assert {r.method.name: r.path is not None for r in runs} == {"map": False, "lora_curve": True}
    # a path setting leaves the run ids of methods without paths unchanged
    plain = parse_suite(tiny_suite(methods=["map"])).runs
    assert [r.run_id for r in runs if r.method.name == "map"] == [r.run_id for r in plain]


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finished_runs(out):
    """metrics.json of renamed (final) run folders; `*` also matches the hidden .tmp-* folders."""
    return [p for p in out.glob("runs/*/metrics.json") if not p.parent.name.startswith(".")]


def test_killed_suite_resumes_without_recomputing(tmp_path):
    plugin_root = install_plugin(tmp_path / "plugin")
    suite_path = tmp_path / "suite.yaml"
    suite = tiny_suite(seeds=[0, 1, 2], datasets=["sst2"],
                       methods=[{"name": "noisy_zero_shot", "config": {"sleep": 1.5}}])
    suite_path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "out"
    env = {"PYTHONPATH": f"{plugin_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = _cli(["run", str(suite_path), "--out", str(out)], env, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not _finished_runs(out):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in _finished_runs(out)}
    assert 1 <= len(finished) < 3, "the kill should land mid-suite"
    again = _cli(["run", str(suite_path), "--out", str(out)], env)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    assert f"{3 - len(finished)} runs executed, {len(finished)} already finished" in output
    assert finished == {p: p.stat().st_mtime_ns for p in finished}  # untouched
    assert len(pd.read_csv(out / "results.csv")) == 3 and not list(out.glob("runs/.tmp-*"))


def test_third_party_method_runs_through_the_runner(tmp_path, monkeypatch):
    from bayeslora.registry import _REGISTRY, reload_entry_points

    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "plugin")))
    reload_entry_points()
    try:
        Runner(parse_suite(tiny_suite(seeds=[0], datasets=["sst2"], methods=["noisy_zero_shot"])), tmp_path).run()
    finally:
        _REGISTRY.pop("noisy_zero_shot", None)
    df = pd.read_csv(tmp_path / "results.csv")
    assert list(df.method) == ["noisy_zero_shot"] and df.num_samples.iloc[0] == 3 and df.mi.iloc[0] > 0


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_suite(methods=["nope"])))
    proc = _cli(["run", str(bad), "--out", str(tmp_path / "o")])
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: unknown method 'nope'" in output and "Traceback" not in output


def test_methods_cli_lists_builtins(capsys):
    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("map", "zero_shot", "mle", "ensemble", "mc_dropout", "temperature"):
        assert name in out


def test_smoke_suite_on_smollm2(tmp_path):
    """The bundled SmolLM2-135M end to end through the shipped smoke suite (< 3 min on 2 cores)."""
    assert cli_main(["run", str(REPO / "configs/suites/smoke.yaml"), "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "results.csv")
    assert set(df.method) == {"zero_shot", "map", "temperature", "mc_dropout", "ensemble"} and len(df) == 10
    assert (df.trunk_layer == 28).all() and (df.time_trunk > 0).any()
    sst = df[df.eval_set == "sst2"].set_index("method")
    assert sst.loc["zero_shot", "acc"] > 0.6  # the bundled model reads sentiment zero-shot
    metrics = json.loads(next(tmp_path.glob("runs/*/metrics.json")).read_text())
    assert metrics["rows"][0]["protocol"].startswith("offline:glue/sst2")
    assert load_suite(REPO / "configs/suites/smoke.yaml").runs[0].model.name == "smollm2-135m"


def test_costs_charge_shared_caches_to_the_cache_and_an_unlabelled_ood_set_reports_no_label_metrics(tmp_path):
    suite = tiny_suite(seeds=[0], methods=["map", "temperature", "vbll"],
                       datasets=[{"name": "sst2", "ood": ["news_as_sst2"]}])
    Runner(parse_suite(suite), tmp_path).run()
    df = pd.read_csv(tmp_path / "results.csv")
    runs = df[df.eval_set == "sst2"].set_index("method")
    # the MAP adapter is trained once (by map, the first to need it): charged to the cache, not to map's fit
    assert runs.loc["map", "cache_map_adapter_seconds"] > 0
    assert runs.loc["temperature", "cache_map_adapter_seconds"] == 0
    assert runs.loc["vbll", "cache_features_seconds"] > 0  # the MAP adapter's features, computed once
    # every method built on that adapter shows the same MAP training time, hit or miss
    assert runs.shared_train_seconds.nunique() == 1 and runs.shared_train_seconds.iloc[0] > 0
    assert runs.protocol_id.nunique() == 3 and runs.hardware.str.contains("cores|x ").all()
    # news sentences posed as reviews carry no sentiment label: only label-free numbers are reported
    news = df[df.eval_set == "news_as_sst2"].set_index("method")
    assert news.acc.isna().all() and news.nll.isna().all() and news.ece.isna().all()
    assert news.acc_na.str.contains("no labels").all()
    assert news.entropy.notna().all() and news.loc[["map", "vbll"], "ood_auroc_entropy"].notna().all()


def test_an_unlabelled_set_cannot_be_trained_on():
    with pytest.raises(ConfigError, match="news_as_sst2 has no labels"):
        parse_suite(tiny_suite(datasets=["news_as_sst2"]))
