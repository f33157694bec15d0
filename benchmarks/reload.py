"""Reloading a finished run (its backbone, data and fitted posterior) from its folder, for later analyses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bayeslora import ConfigError, Posterior, get_method
from bayeslora.backbone import Backbone, load_backbone
from bayeslora.config import DataSettings, LoraSettings, ModelSettings, build_dataclass
from bayeslora.files import DamagedFileError, safe_torch_load

from .runner import DataCache, TaskData, trunk_cache_file
from .store import run_file_intact


@dataclass
class ReloadedRun:
    config: dict[str, Any]
    backbone: Backbone
    task: TaskData
    posterior: Posterior


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A finished run's resolved configuration; a clear error for anything else, including a config.yaml
    or posterior.pt that no longer matches the checksum its metrics.json recorded."""
    if not (run_dir / "config.yaml").exists() or not (run_dir / "metrics.json").exists():
        raise ConfigError(f"{run_dir} is not a finished run folder (expected config.yaml and metrics.json, "
                          f"as written by `bayeslora run` under OUT/runs/<run-id>/)")
    for name in ("config.yaml", "posterior.pt"):
        if (run_dir / name).exists() and not run_file_intact(run_dir, name):
            raise DamagedFileError(f"{run_dir / name} does not match the checksum in its metrics.json")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not isinstance(config, dict) or config.get("run_id") != run_dir.name:
        raise DamagedFileError(f"{run_dir / 'config.yaml'} is not this run's configuration")
    return config


def reload_run(run_dir: str | Path) -> ReloadedRun:
    """Load the run's model, tokenised data and posterior (from ``posterior.pt``); the trunk cache of the
    results folder is reused when the run folder sits in one (OUT/runs/<run-id>/)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    cls = get_method(config["method"]["name"])
    state_file = run_dir / "posterior.pt"
    if not state_file.exists():
        raise ConfigError(f"{run_dir} has no posterior.pt: method {cls.name!r} does not save its fitted state "
                          f"(Posterior.saves_state is False), so it cannot be reloaded")
    method_config = cls.make_config(config["method"]["config"])
    model = build_dataclass(ModelSettings, config["model"], "model")
    backbone = load_backbone(model)
    lora = getattr(method_config, "lora", None)
    trunk = backbone.configure_trunk_cache(model.trunk_cache, lora if isinstance(lora, LoraSettings) else None)
    if trunk is not None:  # a missing file is a no-op
        trunk.load(trunk_cache_file(run_dir.parent.parent, trunk))
    data = build_dataclass(DataSettings, config["data"], "data")
    task = DataCache().get(backbone, config["dataset"]["name"], data)
    posterior = cls(method_config, seed=config["seed"])
    posterior.attach(backbone)
    posterior.load_state_dict(safe_torch_load(state_file, map_location=backbone.device))
    return ReloadedRun(config, backbone, task, posterior)
