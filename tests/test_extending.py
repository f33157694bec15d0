"""The plugin example of docs/extending.md, installed as a real distribution, runs in a suite next to map
and a built-in sampling method, and starts from the MAP adapter that map trained."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from bayeslora.registry import _REGISTRY, reload_entry_points
from benchmarks.runner import Runner
from benchmarks.suite import parse_suite

from .test_trust import suite_raw

REPO = Path(__file__).parents[1]


def example_source() -> str:
    text = (REPO / "docs" / "extending.md").read_text()
    match = re.search(r"<!-- plugin-example -->\n```python\n(.*?)```", text, flags=re.S)
    assert match, "docs/extending.md lost its plugin example"
    return match.group(1)


def test_the_example_is_short():
    code = [ln for ln in example_source().splitlines() if ln.strip() and not ln.strip().startswith(("from", "import"))]
    assert len(code) <= 22  # a method that samples around the cached MAP adapter, config and docstrings included
    method = example_source().split("class IsotropicGaussian")[1]
    assert len([ln for ln in method.splitlines() if ln.strip() and not ln.strip().startswith('"""')]) <= 16


@pytest.mark.integration
def test_the_docs_plugin_runs_in_a_suite_with_map_and_mc_dropout(tmp_path, monkeypatch):
    root = tmp_path / "site"
    (root / "iso_plugin").mkdir(parents=True)
    (root / "iso_plugin" / "__init__.py").write_text(example_source())
    dist = root / "iso_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: iso-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[bayeslora.methods]\nisotropic = iso_plugin:IsotropicGaussian\n")
    monkeypatch.syspath_prepend(str(root))
    reload_entry_points()
    try:
        raw = suite_raw(methods=["map", "isotropic", "mc_dropout"], num_samples=4, seeds=[0],
                        lora={"r": 2, "alpha": 4, "dropout": 0.1})
        Runner(parse_suite(raw), tmp_path / "out").run()
    finally:
        _REGISTRY.pop("isotropic", None)
        monkeypatch.undo()
        reload_entry_points()
    rows = pd.read_csv(tmp_path / "out" / "results.csv").set_index("method")
    assert set(rows.index) == {"map", "isotropic", "mc_dropout"}
    assert rows.loc["isotropic", "reused_cache"] and rows.loc["isotropic", "num_samples"] == 4
    assert rows.loc["isotropic", "mi"] > 0 and rows.loc["isotropic", "method_code"].startswith("iso-plugin 1.0 ")
