"""What a user may rely on when opening, rerunning and sharing results folders (README, "What is guaranteed").

Unit tests first (crafted files, caches, settings); the tests that run suites on the tiny random model
and the bundled data are marked ``integration``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bayeslora import ConfigError, Predictive
from bayeslora.artifacts import ArtifactStore
from bayeslora.assets import check_prepared, write_asset_manifest
from bayeslora.files import DamagedFileError, remove_orphans, temp_prefix, value_digest
from bayeslora.identity import source_digest
from bayeslora.metrics import ood_metrics
from benchmarks.analysis import load_predictives
from benchmarks.cli import main as cli_main
from benchmarks.pairwise import pairwise_table
from benchmarks.runner import Runner
from benchmarks.store import read_rows
from benchmarks.suite import parse_suite

from .conftest import tiny_model_settings
from .plugin_fixture import install_plugin, uninstall_plugin

REPO = Path(__file__).parents[1]


class Payload:
    """Unpickling this object touches ``marker``: proof that a load executed code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted_file(path: Path, marker: Path, wrap=lambda p: p) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wrap(Payload(marker)), path)
    return path


# ------------------------------------------------------------------ loading never executes code
def test_a_pickled_payload_in_a_predictive_file_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = crafted_file(tmp_path / "predictive.pt", marker,
                        lambda p: {"logits": torch.zeros(1, 1, 2), "labels": torch.zeros(1), "example_ids": [p]})
    with pytest.raises(DamagedFileError, match="predictive.pt"):
        Predictive.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["map_adapter", "features", "lora_xs_svd"])
def test_a_pickled_payload_in_a_cache_entry_is_never_executed_and_is_removed(tmp_path, kind):
    store, marker, key = ArtifactStore(tmp_path / "cache"), tmp_path / "executed", {"seed": 0}
    crafted_file(store.path(kind, key), marker, lambda p: {"format": "bayeslora-artifact/1", "key": key,
                                                           "checksum": "", "value": p})
    assert store.get(kind, key) is None
    assert not marker.exists() and not store.path(kind, key).exists() and store.discarded


def test_a_pickled_payload_in_a_trunk_cache_file_is_never_executed(tmp_path, tiny_backbone):
    from bayeslora.config import LoraSettings

    trunk = tiny_backbone.configure_trunk_cache("auto", LoraSettings(layers=[1]))
    marker = tmp_path / "executed"
    path = crafted_file(tmp_path / "trunk.pt", marker, lambda p: {"fingerprint": trunk.fingerprint, "layer": 1,
                                                                  "entries": {"x": p}})
    assert trunk.load(path) is False and not marker.exists() and not path.exists()


def test_a_report_over_a_folder_with_a_crafted_predictive_executes_nothing(tmp_path):
    from .test_report import rid, synthetic_folder

    out = synthetic_folder(tmp_path / "res", ood=())
    marker = tmp_path / "executed"
    crafted_file(out / "runs" / rid("mcd1") / "predictive.pt", marker,
                 lambda p: {"logits": torch.zeros(40, 6, 2), "labels": torch.zeros(40), "example_ids": [p]})
    assert cli_main(["report", str(out)]) == 0
    assert not marker.exists()


def test_a_row_with_a_traversal_run_id_reads_nothing_outside_the_folder(tmp_path, monkeypatch):
    from .test_report import rid, write_run

    out = tmp_path / "shared" / "res"
    write_run(out, "a", "map", 0, 1)
    outside = tmp_path / "outside" / "x"
    outside.mkdir(parents=True)
    Predictive(torch.zeros(2, 1, 2), torch.zeros(2, dtype=torch.long), ["a", "b"]).save(outside / "predictive.pt")
    metrics = out / "runs" / rid("a") / "metrics.json"
    data = json.loads(metrics.read_text())
    data["rows"][0]["run_id"] = "../../../outside/x"
    metrics.write_text(json.dumps(data))
    assert read_rows(out) == []  # the row does not name its own folder: the run is skipped
    opened = []
    monkeypatch.setattr(Predictive, "load", classmethod(lambda cls, p: opened.append(p)))
    table = pd.DataFrame([{**data["rows"][0], "eval_set": "sst2"},
                          {**data["rows"][0], "run_id": rid("a"), "eval_set": "../../../outside/x/predictive"}])
    found, missing = load_predictives(out, table)
    assert found == [] and opened == [] and len(missing) == 2


# ------------------------------------------------------------------ caches: checksums, keys, orphans
def test_cache_records_carry_their_key_and_checksum(tmp_path):
    store = ArtifactStore(tmp_path)
    value = {"adapter": {"w": torch.arange(6.0).reshape(2, 3)}, "result": {"steps": 3, "history": [{"x": 1.0}]}}
    store.save("map_adapter", {"seed": 0}, value)
    store.save("map_adapter", {"seed": 1}, {"adapter": {"w": torch.ones(2, 3)}, "result": {}})
    assert value_digest(store.get("map_adapter", {"seed": 0})) == value_digest(value)
    # a foreign entry (another key's file in this key's place) is refused and removed
    os.replace(store.path("map_adapter", {"seed": 1}), store.path("map_adapter", {"seed": 0}))
    assert store.get("map_adapter", {"seed": 0}) is None and not store.path("map_adapter", {"seed": 0}).exists()
    # a tensor changed after writing fails the checksum
    store.save("map_adapter", {"seed": 2}, value)
    record = torch.load(store.path("map_adapter", {"seed": 2}), weights_only=True)
    record["value"]["adapter"]["w"][0, 0] = 99.0
    torch.save(record, store.path("map_adapter", {"seed": 2}))
    assert store.get("map_adapter", {"seed": 2}) is None
    # a truncated file
    store.save("map_adapter", {"seed": 3}, value)
    path = store.path("map_adapter", {"seed": 3})
    path.write_bytes(path.read_bytes()[:100])
    assert store.get("map_adapter", {"seed": 3}) is None and len(store.discarded) == 3


def test_orphan_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname().replace("-", "_")
    orphan = tmp_path / f".tmp-{host}-{dead_pid}-abc.pt"
    orphan_run = tmp_path / f".tmp-0123456789abcdef-{host}-{dead_pid}-xyz"
    live = tmp_path / f"{temp_prefix('0123456789abcdef')}live"
    foreign = tmp_path / f".tmp-otherhost-{dead_pid}-abc.pt"
    old_style, fresh_old_style = tmp_path / ".tmp-k2j4x9.pt", tmp_path / ".tmp-q8w7e6.pt"
    for p in (orphan, foreign, old_style, fresh_old_style):
        p.write_text("x")
    two_days_ago = os.path.getmtime(old_style) - 2 * 24 * 3600
    os.utime(old_style, (two_days_ago, two_days_ago))
    for p in (orphan_run, live):
        p.mkdir()
    assert sorted(remove_orphans(tmp_path)) == sorted([orphan, orphan_run, old_style])
    assert live.exists() and foreign.exists() and fresh_old_style.exists()


def test_prepared_assets_are_verified_by_size_and_by_hash(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0123456789")
    (folder / "config.json").write_text("{}")
    write_asset_manifest(folder, "w.whl")
    assert check_prepared(folder, "w.whl") is None and check_prepared(folder, "other.whl") is not None
    (folder / "model.safetensors").write_bytes(b"0123456788")  # same size, other content
    assert check_prepared(folder, "w.whl") is None
    assert "differs" in check_prepared(folder, "w.whl", hashes=True)
    (folder / "model.safetensors").write_bytes(b"01234")
    assert "truncated" in check_prepared(folder, "w.whl")


# ------------------------------------------------------------------ numbers below float noise
def test_ood_auroc_of_a_score_at_float_noise_is_not_reported():
    g = torch.Generator().manual_seed(0)
    id_logits, ood_logits = torch.randn(30, 1, 2, generator=g), 0.1 * torch.randn(30, 1, 2, generator=g)
    out = ood_metrics(id_logits.expand(30, 5, 2) + 1e-9 * torch.randn(30, 5, 2, generator=g),
                      ood_logits.expand(30, 5, 2))
    assert np.isnan(out["ood_auroc_mi"]) and "float noise" in out["ood_auroc_mi_na"]
    assert 0.0 <= out["ood_auroc_entropy"] <= 1.0 and "ood_auroc_entropy_na" not in out
    spread = ood_metrics(torch.randn(30, 5, 2, generator=g), torch.randn(30, 5, 2, generator=g))
    assert not np.isnan(spread["ood_auroc_mi"])


def test_paired_p_values_on_differences_at_float_noise_are_not_reported():
    rows = [{"model": "m", "dataset": "sst2", "eval_set": "sst2", "method": meth, "seed": s,
             "nll": 0.5 + 0.01 * s + (1e-9 * s if meth == "b" else 0.0), "acc": 0.8 + (0.05 * s if meth == "c" else 0)}
            for meth in ("map", "b", "c") for s in range(3)]
    table = pairwise_table(pd.DataFrame(rows), metrics=["nll", "acc"]).set_index("method")
    assert np.isnan(table.loc["b", "p_seeds_nll"]) and table.loc["b", "p_seeds_nll_na"] == "differences at float noise"
    assert not np.isnan(table.loc["c", "p_seeds_acc"])


def test_leaderboard_shows_n_a_with_the_reason(tmp_path):
    from benchmarks.leaderboard import build_leaderboard

    from .test_report import write_run

    write_run(tmp_path, "m0", "map", 0, 1, ood=("boolq",))
    _, markdown = build_leaderboard(tmp_path)
    assert "| n/a " in markdown
    assert "## Not applicable (n/a)" in markdown and "float noise" in markdown


# ------------------------------------------------------------------ settings checked before any model loads
def suite_raw(**changes) -> dict:
    return {"name": "tiny", "num_samples": 2, "seeds": [0], "model": tiny_model_settings("llama"),
            "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
            "train": {"epochs": 1, "lr": 1e-2, "batch_size": 8, "progress": False},
            "data": {"max_train": 16, "max_val": 8, "max_test": 12}, "datasets": ["sst2"],
            "methods": ["zero_shot", "map"], **changes}


def tiny_suite_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_raw(**changes), sort_keys=False))
    return path


BAD_SETTINGS = [
    ("train.lr=-1", "train.lr must be > 0"), ("train.weight_decay=-1", "weight_decay must be >= 0"),
    ("lora.r=0", "lora.r must be > 0"), ("lora.r=2.5", "lora.r must be an integer"),
    ("lora.dropout=1.5", "lora.dropout must be >= 0 and < 1"), ("n_bins=abc", "n_bins"), ("n_bins=0", "n_bins"),
    ("seeds=[0,", "not valid YAML"), ("train=5", "'train' must be a mapping"),
    ("data.max_train=-5", "max_train must be > 0"), ("seeds=[true]", "seeds must be a list of non-negative"),
    ("train.lr=0", "train.lr must be > 0"), ("data.files={valid: x.jsonl}", "unknown split"),
    ("train.schedule=steps", "schedule must be one of"), ("train.keep=best", "keep must be one of"),
    ("model.dtype=fp8", "dtype must be one of"), ("methods=[{name: lora_curve, config: {mode: x}}]", "mode"),
    ("methods=[{name: ensemble, config: {members: 0}}]", "members must be > 0"),
    ("methods=[{name: mc_dropout, config: {p: 1.5}}]", "p must be >= 0 and < 1"),
    ("model={name: no-such-model}", "not a known alias"), ("model={name: ./no/such/folder}", "does not exist"),
    ("data={source: files, files: {train: /no/such.jsonl, test: /no/such.jsonl}}", "does not exist"),
]


@pytest.fixture()
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr("benchmarks.runner.load_backbone", refuse)


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS)
def test_each_bad_setting_exits_2_with_one_line_before_the_model_loads(setting, message, tmp_path, capsys,
                                                                       no_model_loads):
    suite = tiny_suite_file(tmp_path)
    assert cli_main(["run", str(suite), "--out", str(tmp_path / "out"), "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_bad_local_data_files_are_named_with_their_line(tmp_path, capsys, no_model_loads):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "awful", "label": 0}\n')
    cases = {"empty.jsonl": ("", "is empty"),
             "broken.jsonl": ('{"sentence": "fine", "label": 1}\n{"sentence": "x", "label": \n', "line 2"),
             "float.jsonl": ('{"sentence": "fine", "label": 1.7}\n', "label must be an integer"),
             "range.jsonl": ('{"sentence": "fine", "label": 3}\n', "out of range")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        data = f"data={{source: files, files: {{train: {tmp_path / name}, test: {good}}}}}"
        assert cli_main(["run", str(tiny_suite_file(tmp_path)), "--out", str(tmp_path / "out"), "--set", data]) == 2
        err = capsys.readouterr().err.strip()
        assert name in err and message in err and "\n" not in err, err


def test_paths_that_are_not_what_they_should_be(tmp_path, capsys, no_model_loads):
    suite = tiny_suite_file(tmp_path)
    assert cli_main(["run", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is not a file" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert cli_main(["run", str(suite), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    assert cli_main(["run", str(suite), "--out", str(tmp_path / "out"), "--set", f"model={{name: {empty_model}}}"]) == 2
    assert "no config.json" in capsys.readouterr().err
    (empty_model / "config.json").write_text("{}")
    assert cli_main(["run", str(suite), "--out", str(tmp_path / "out"), "--set", f"model={{name: {empty_model}}}"]) == 2
    assert "holds no weights" in capsys.readouterr().err


def test_a_users_own_suite_file_in_out_is_never_overwritten(tmp_path, capsys, no_model_loads):
    out = tmp_path / "out"
    out.mkdir()
    mine = "# my notes\nname: mine\n"
    (out / "suite.yaml").write_text(mine)
    assert cli_main(["run", str(tiny_suite_file(tmp_path)), "--out", str(out)]) == 2
    assert "did not write" in capsys.readouterr().err and (out / "suite.yaml").read_text() == mine


# ------------------------------------------------------------------ suites on the tiny model
def run_ids(raw: dict) -> dict[str, str]:
    return {s.title: s.run_id for s in parse_suite(raw).runs}


@pytest.mark.integration
def test_editing_a_data_file_reruns_exactly_the_runs_that_read_it(tmp_path):
    rows = [{"sentence": f"review number {i} was {'great' if i % 2 else 'dull'}", "label": i % 2} for i in range(24)]
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    raw = suite_raw(datasets=[{"name": "sst2", "data": {"source": "files", "files": {"train": str(train),
                                                                                      "test": str(test)}}},
                              "boolq"], methods=["zero_shot"])
    out = tmp_path / "out"
    assert len(Runner(parse_suite(raw), out).run()) == 2
    flipped = [{**r, "label": 1 - r["label"]} for r in rows[16:]]
    test.write_text("".join(json.dumps(r) + "\n" for r in flipped))
    executed = Runner(parse_suite(raw), out).run()
    assert [s.dataset.name for s in parse_suite(raw).runs if s.run_id in executed] == ["sst2"]
    results = pd.read_csv(out / "results.csv").set_index("dataset")
    assert len(results) == 2 and results.loc["sst2", "n_examples"] == 8


@pytest.mark.integration
def test_a_plugins_version_and_a_methods_source_each_rerun_only_their_runs(tmp_path, monkeypatch):
    from bayeslora.registry import _REGISTRY, reload_entry_points

    root = install_plugin(tmp_path / "plugin")
    uninstall_plugin(root)  # no module or class left from another test's copy of the plugin
    _REGISTRY.pop("noisy_zero_shot", None)
    monkeypatch.syspath_prepend(str(root))
    reload_entry_points()
    try:
        raw = suite_raw(methods=["zero_shot", {"name": "noisy_zero_shot", "config": {"noise": 0.5}}])
        out = tmp_path / "out"
        before = run_ids(raw)
        assert len(Runner(parse_suite(raw), out).run()) == 2
        # a new release of the plugin
        meta = root / "toy_bayes_plugin-0.1.dist-info" / "METADATA"
        meta.write_text(meta.read_text().replace("Version: 0.1", "Version: 0.2"))
        bumped = run_ids(raw)
        changed = {title for title in before if before[title] != bumped[title]}
        assert changed == {t for t in before if "noisy_zero_shot" in t}
        assert Runner(parse_suite(raw), out).run() == [bumped[t] for t in changed]
        rows = pd.read_csv(out / "results.csv").set_index("method")
        assert rows.loc["noisy_zero_shot", "method_code"].startswith("toy-bayes-plugin 0.2 ")
        # a docstring edit changes nothing; a code edit reruns the method's runs only
        source = root / "toy_bayes_plugin" / "__init__.py"
        source.write_text(source.read_text().replace('"""Zero-shot logits', '"""Edited: zero-shot logits'))
        source_digest.cache_clear()
        assert run_ids(raw) == bumped
        source.write_text(source.read_text().replace("self.config.noise * torch.randn", "0.5 * self.config.noise "
                                                                                         "* torch.randn"))
        source_digest.cache_clear()
        edited = run_ids(raw)
        assert {t for t in bumped if bumped[t] != edited[t]} == changed
    finally:
        source_digest.cache_clear()
        _REGISTRY.pop("noisy_zero_shot", None)
        uninstall_plugin(root)


@pytest.mark.integration
def test_a_truncated_or_foreign_cache_entry_is_recomputed_and_equals_a_clean_run(tmp_path):
    out = tmp_path / "out"
    Runner(parse_suite(suite_raw(methods=["map"], seeds=[0, 1])), out).run()
    adapters = sorted((out / "cache" / "map_adapter").glob("*.pt"))
    assert len(adapters) == 2
    clean = {p.parent.name: Predictive.load(p).logits for p in (out / "runs").glob("*/predictive.pt")}
    seed0 = next(iter(parse_suite(suite_raw(methods=["map"], seeds=[0])).runs))
    # seed 0's adapter truncated, then the same adapter trained again by a new method entry
    record = torch.load(adapters[0], weights_only=True)
    victim = next(p for p in adapters if torch.load(p, weights_only=True)["key"]["seed"] == 0)
    other = next(p for p in adapters if p != victim)
    for damage in ("truncate", "foreign"):
        if damage == "truncate":
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        else:
            victim.write_bytes(other.read_bytes())
        label = f"map-{damage}"
        raw = suite_raw(methods=["map", {"name": "map", "label": label}], seeds=[0])
        Runner(parse_suite(raw), out).run()
        again = next(s for s in parse_suite(raw).runs if s.method.label == label)
        row = pd.read_csv(out / "results.csv").set_index("method").loc[label]
        assert not row["reused_cache"]  # recomputed, not read from the damaged file
        logits = Predictive.load(out / "runs" / again.run_id / "predictive.pt").logits
        torch.testing.assert_close(logits, clean[seed0.run_id], rtol=1e-5, atol=1e-6)
    assert record["format"] == "bayeslora-artifact/1"


@pytest.mark.integration
def test_a_damaged_run_folder_is_redone_and_skipped_with_a_warning_until_then(tmp_path, caplog):
    out = tmp_path / "out"
    raw = suite_raw()
    Runner(parse_suite(raw), out).run()
    spec = parse_suite(raw).runs[1]
    metrics = out / "runs" / spec.run_id / "metrics.json"
    metrics.write_text(metrics.read_text()[:50])
    with caplog.at_level("WARNING"):
        assert len(read_rows(out)) == 1
    assert str(out / "runs" / spec.run_id) in caplog.text
    assert Runner(parse_suite(raw), out).run() == [spec.run_id]
    predictive = out / "runs" / spec.run_id / "predictive.pt"
    predictive.write_bytes(predictive.read_bytes()[:-10])
    assert Runner(parse_suite(raw), out).run() == [spec.run_id]  # a truncated predictive: redone too
    assert Runner(parse_suite(raw), out, rerun=["zero_shot"]).run() == [parse_suite(raw).runs[0].run_id]
    with pytest.raises(ConfigError, match="not a method"):
        Runner(parse_suite(raw), out, rerun=["nope"])


@pytest.mark.integration
def test_two_concurrent_runners_on_one_folder_execute_every_run_once(tmp_path):
    """Each run of the plugin method sleeps 2 s in fit, so the two processes overlap."""
    plugin = install_plugin(tmp_path / "plugin")
    suite = tiny_suite_file(tmp_path, seeds=[0, 1, 2, 3], methods=[{"name": "noisy_zero_shot",
                                                                     "config": {"sleep": 2.0}}])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.cli", "run", str(suite), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO)])}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    executed = [int(o[0].strip().splitlines()[-1].split()[0]) for o in outputs]
    assert sum(executed) == 4, outputs
    assert len(pd.read_csv(out / "results.csv")) == 4
    runs = [p for p in (out / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 4 and not list((out / "runs").glob(".tmp-*"))
    assert all("INFO" in (r / "log.txt").read_text() for r in runs)  # the run log without -v


def test_a_truncated_local_model_is_named_not_a_traceback(tmp_path, tiny_backbone, capsys):
    from bayeslora.backbone import load_backbone
    from bayeslora.errors import AssetError

    folder = tmp_path / "model"
    tiny_backbone.lm.save_pretrained(folder)
    tiny_backbone.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AssetError, match=str(folder)):
        load_backbone({"name": str(folder), "max_length": 64})


def test_docstrings_and_comments_do_not_change_a_source_digest(tmp_path, monkeypatch):
    package = tmp_path / "digest_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    body = '"""Module doc."""\n\nclass C:\n    """Doc."""\n\n    x: int = 1\n    """Field doc."""\n\n' \
           '    def f(self):  # a comment\n        return 1\n'
    (package / "m.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    first = source_digest("digest_pkg.m", ("digest_pkg",))
    (package / "m.py").write_text(body.replace("Field doc.", "Other words.").replace("# a comment", "# edited"))
    source_digest.cache_clear()
    assert source_digest("digest_pkg.m", ("digest_pkg",)) == first
    (package / "m.py").write_text(body.replace("return 1", "return 2"))
    source_digest.cache_clear()
    assert source_digest("digest_pkg.m", ("digest_pkg",)) != first
    source_digest.cache_clear()
