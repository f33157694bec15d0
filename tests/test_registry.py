import subprocess
import sys
from pathlib import Path

import pytest

import bayeslora
from bayeslora import ConfigError, Posterior, UnknownMethodError, get_method, register
from bayeslora.registry import _REGISTRY, method_names, reload_entry_points

from .plugin_fixture import install_broken_plugin, install_plugin, uninstall_plugin

REPO = Path(__file__).parents[1]


def test_builtins_are_registered_through_entry_points():
    methods = bayeslora.available_methods()
    assert {"zero_shot", "map", "mle"} <= set(methods)
    assert methods["map"].__module__ == "baselines.map_lora"


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownMethodError, match="Registered methods: .*map"):
        get_method("laplace_lorra")


def test_register_decorator_and_bad_config_keys():
    @register("tmp_test_method")
    class Tmp(Posterior):
        def fit(self, backbone, train, val=None): ...
        def predict(self, loader, num_samples): ...
        def state_dict(self): return {}
        def load_state_dict(self, state): ...

    try:
        assert get_method("tmp_test_method") is Tmp and Tmp.name == "tmp_test_method"
        with pytest.raises(ConfigError, match="valid keys: \\['lora', 'train'\\]"):
            get_method("map")({"lr": 1.0})
        with pytest.raises(TypeError):
            register("not_a_posterior")(int)
    finally:
        _REGISTRY.pop("tmp_test_method")


def test_third_party_entry_point_is_discovered(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path)))
    try:
        reload_entry_points()
        cls = get_method("noisy_zero_shot")
        assert cls.__module__ == "toy_bayes_plugin" and cls.Config().noise == 1.0
    finally:
        _REGISTRY.pop("noisy_zero_shot", None)
        uninstall_plugin(tmp_path)


def test_lookups_import_only_the_method_asked_for():
    code = ("import sys; from bayeslora import get_method; get_method('map'); from benchmarks.cli import main; "
            "main(['methods']); print([m for m in ('pyro', 'vbll', 'baselines.bbb_lora') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bbb_lora" in proc.stdout and "Bayes-by-backprop" in proc.stdout  # listed, read from the source
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_broken_plugin_breaks_only_its_own_method(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_broken_plugin(tmp_path)))
    reload_entry_points()
    try:
        assert "broken_method" in method_names()
        assert get_method("map").__module__ == "baselines.map_lora"
        with pytest.raises(ConfigError, match="broken-bayes-plugin 0.3.*fails to import.*a_dependency"):
            get_method("broken_method")
    finally:
        monkeypatch.undo()
        reload_entry_points()
    assert "broken_method" not in method_names()
