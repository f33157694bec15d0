"""Suite files: models x methods x datasets x seeds (+ OOD evaluation sets), expanded into runs.

A suite YAML::

    name: smoke
    num_samples: 10            # S, the same for every method of the comparison
    seeds: [0, 1, 2]
    model: {name: smollm2-135m, max_length: 256}   # or `models: [...]`, each over `model`'s defaults
    lora:  {r: 8, alpha: 16, dropout: 0.1, target_modules: [q_proj, v_proj], layers: {top: 4}}
    train: {epochs: 1, lr: 5.0e-4, batch_size: 8}
    data:  {max_train: 400, max_val: 48, max_test: 400}
    datasets:
      - sst2
      - {name: obqa, ood: [arc_challenge, mmlu_college_physics]}
      - {name: boolq, data: {max_train: 200}}                      # per-dataset data overrides
    methods:
      - map
      - {name: map, label: map-wd0.1, train: {weight_decay: 0.1}}   # per-method lora/train overrides
      - {name: some_method, config: {key: value}}                    # the method's own Config
      - {name: ensemble, seeds: [0], config: {members: 3}}           # per-method seeds
      - {name: laplace_lora, datasets: [sst2]}                       # per-method datasets
    path: {points: 21, splits: [train, test], max_examples: 128, methods: [lora_curve], datasets: [sst2]}
                               # loss along weight-space paths after predicting, for the listed method
                               # labels and datasets (default: every method that defines paths(), e.g.
                               # lora_curve, on every dataset)

Every run is keyed by a hash of its fully resolved configuration and of its inputs (see
:mod:`bayeslora.identity`: the model's weights, the data's content, the method's and the metrics'
code), so a finished run is found again and never recomputed, and any change to what determines it
gives a new run. Every setting is checked here, before any model loads.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bayeslora import ConfigError, get_method
from bayeslora.artifacts import content_hash
from bayeslora.config import (
    RESULT_NEUTRAL_MODEL_FIELDS,
    DataSettings,
    LoraSettings,
    ModelSettings,
    TrainSettings,
    build_dataclass,
    to_plain,
    train_key,
)
from bayeslora.data import get_task
from bayeslora.identity import data_identity, evaluation_code, method_code, model_identity
from bayeslora.model_source import check_model_source
from bayeslora.paths import PathSettings

SUITE_KEYS = {"name", "description", "num_samples", "seeds", "model", "models", "lora", "train", "data",
              "datasets", "methods", "n_bins", "path"}
SECTION_TYPES = {"name": str, "description": str, "models": list, "lora": dict, "train": dict,
                 "data": dict, "datasets": list, "methods": list, "path": dict}
RESULT_SCHEMA_VERSION = 2
"""2: run ids also hash the run's inputs (model weights, data content, code)."""


@dataclass
class MethodEntry:
    name: str
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None
    datasets: list[str] | None = None
    """Dataset names this method runs on (None: all of the suite's)."""


@dataclass
class DatasetEntry:
    name: str
    ood: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSpec:
    """One (model, method, dataset, seed) run, fully resolved."""

    suite: str
    model: ModelSettings
    method: MethodEntry
    method_config: Any
    dataset: DatasetEntry
    data: DataSettings
    seed: int
    num_samples: int
    n_bins: int
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The suite's LoRA settings with the method's overrides (decides the trunk-cache layer)."""
    path: PathSettings | None = None
    """Path analysis after predicting (the suite's ``path:``), for methods that define ``paths()``."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """What the numbers depend on besides the settings: model, data and code identities."""

    def resolved(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA_VERSION,
            "model": to_plain(self.model),
            "method": {"name": self.method.name, "label": self.method.label, "config": to_plain(self.method_config)},
            "dataset": to_plain(self.dataset),
            "data": to_plain(self.data),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "n_bins": self.n_bins,
            **({"path": to_plain(self.path)} if self.path is not None else {}),
        }

    def keyed(self) -> dict[str, Any]:
        """:meth:`resolved` without what does not change results: progress bars, the device, the trunk cache."""
        resolved = self.resolved()
        for key in RESULT_NEUTRAL_MODEL_FIELDS:
            resolved["model"].pop(key, None)
        cfg = resolved["method"]["config"] = train_key(resolved["method"]["config"])
        if isinstance(cfg, dict) and isinstance(cfg.get("train"), dict):
            cfg["train"].pop("progress", None)
        return resolved

    @property
    def run_id(self) -> str:
        return content_hash({**self.keyed(), "inputs": self.inputs})

    @property
    def protocol_id(self) -> str:
        """What makes two runs' numbers comparable: the run id's settings and model and data identities,
        without the seed and the code (12 hex digits). Runs of one method with equal protocol ids may be
        pooled over seeds, whichever folder, machine or code version produced them."""
        keyed = self.keyed()
        keyed.pop("seed")
        inputs = {k: v for k, v in self.inputs.items() if k != "code"}
        return content_hash({**keyed, "inputs": inputs})[:12]

    @property
    def title(self) -> str:
        return f"{self.model.name} / {self.method.label} / {self.dataset.name} / seed {self.seed}"


@dataclass
class Suite:
    name: str
    raw: dict[str, Any]
    runs: list[RunSpec]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a mapping in the suite")
    node[keys[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (numbers, lists, booleans)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"--set expects key=value, got {item!r} (e.g. --set data.max_test=32)")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or "not valid YAML")
            raise ConfigError(f"--set {key.strip()}: the value {value!r} is not valid YAML ({problem}); "
                              f"quote strings and close brackets, e.g. --set seeds=[0,1]") from None
        _set_dotted(raw, key.strip(), parsed)
    return raw


def _method_entry(item: Any, i: int) -> MethodEntry:
    if isinstance(item, str):
        return MethodEntry(item, item)
    if not isinstance(item, dict) or "name" not in item:
        raise ConfigError(f"methods[{i}] must be a method name or a mapping with 'name', got {item!r}")
    unknown = set(item) - {"name", "label", "config", "lora", "train", "seeds", "datasets"}
    if unknown:
        raise ConfigError(f"methods[{i}] has unknown keys {sorted(unknown)}; "
                          f"valid: name, label, config, lora, train, seeds, datasets")
    seeds = item.get("seeds")
    if seeds is not None:
        _check_seeds(seeds, f"methods[{i}].seeds")
    datasets = item.get("datasets")
    if datasets is not None and (not isinstance(datasets, list) or not datasets
                                 or not all(isinstance(d, str) for d in datasets)):
        raise ConfigError(f"methods[{i}].datasets must be a list of dataset names, got {datasets!r}")
    return MethodEntry(item["name"], item.get("label", item["name"]), dict(item.get("config") or {}),
                       dict(item.get("lora") or {}), dict(item.get("train") or {}), seeds, datasets)


def _check_seeds(seeds: Any, where: str) -> None:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                           for s in seeds):
        raise ConfigError(f"{where} must be a list of non-negative integers (at least one), got {seeds!r}")


def _check_sections(raw: dict[str, Any]) -> None:
    """Each top-level section has the type a suite needs (e.g. ``--set train=5`` is refused here)."""
    for key, kind in SECTION_TYPES.items():
        value = raw.get(key)
        if value is not None and not isinstance(value, kind):
            wanted = {dict: "a mapping", list: "a list", str: "a string"}
            names = " or ".join(wanted[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigError(f"suite section {key!r} must be {names}, got {type(value).__name__}: {value!r:.80}")
    n_bins = raw.get("n_bins", 15)
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ConfigError(f"n_bins (ECE bins) must be a positive integer, got {n_bins!r}")


def _dataset_entry(item: Any, i: int) -> DatasetEntry:
    entry = DatasetEntry(item) if isinstance(item, str) else None
    if entry is None:
        if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "ood", "data"}:
            raise ConfigError(f"datasets[{i}] must be a name or {{name: ..., ood: [...], data: {{...}}}}, "
                              f"got {item!r}")
        entry = DatasetEntry(item["name"], list(item.get("ood") or []), dict(item.get("data") or {}))
    for name in [entry.name, *entry.ood]:
        get_task(name)  # unknown dataset -> DataError listing the known ones
    if not get_task(entry.name).labelled:
        raise ConfigError(f"datasets[{i}]: {entry.name} has no labels, so nothing can be trained on it; use it "
                          f"as an OOD set, e.g. {{name: sst2, ood: [{entry.name}]}}")
    return entry


def _method_config(entry: MethodEntry, raw: dict[str, Any]) -> Any:
    cls = get_method(entry.name)
    values = dict(entry.config)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    for section, settings_cls in (("lora", LoraSettings), ("train", TrainSettings)):
        merged = {**(raw.get(section) or {}), **getattr(entry, section)}
        if section in names:
            try:
                values[section] = build_dataclass(settings_cls, {**merged, **values.get(section, {})}, section)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in the settings of method {entry.label!r})") from None
        elif getattr(entry, section):
            raise ConfigError(f"method {entry.label!r} has no {section} settings; remove methods[].{section}")
    return cls.make_config(values)


def _run_lora(method_config: Any, raw: dict[str, Any]) -> LoraSettings:
    """The LoRA settings a run's adapters use: the method's own (suite + method overrides + its config),
    or the suite's for methods without adapters (they only decide where the trunk cache stops)."""
    own = getattr(method_config, "lora", None)
    return own if isinstance(own, LoraSettings) else build_dataclass(LoraSettings, raw.get("lora") or {}, "lora")


def has_paths(cls: type) -> bool:
    """Whether a method class offers weight-space paths for the path analysis (``paths()``)."""
    return callable(getattr(cls, "paths", None))


def _path_settings(raw: Any, methods: list[MethodEntry],
                   datasets: list[DatasetEntry]) -> dict[tuple[str, str], PathSettings | None]:
    """Per (method label, dataset): the suite's ``path:`` settings, for methods with paths (and for the
    listed methods and datasets, where ``path.methods`` / ``path.datasets`` list them)."""
    if raw is None:
        return {(m.label, d.name): None for m in methods for d in datasets}
    if not isinstance(raw, dict):
        raise ConfigError(f"path must be a mapping such as {{points: 21, max_examples: 64}}, got {raw!r}")
    raw = dict(raw)
    wanted = raw.pop("methods", None)
    wanted_data = raw.pop("datasets", None)
    names = [d.name for d in datasets]
    if wanted_data is not None and (not isinstance(wanted_data, list) or set(wanted_data) - set(names)):
        raise ConfigError(f"path.datasets must list datasets of this suite ({names}), got {wanted_data!r}")
    settings = build_dataclass(PathSettings, raw, "path")
    settings.check()
    labels = [m.label for m in methods]
    if wanted is not None and (not isinstance(wanted, list) or set(wanted) - set(labels)):
        raise ConfigError(f"path.methods must list method labels of this suite ({labels}), got {wanted!r}")
    for m in methods:
        if wanted is not None and m.label in wanted and not has_paths(get_method(m.name)):
            raise ConfigError(f"path.methods lists {m.label!r}, but method {m.name!r} has no weight-space paths")
    return {(m.label, d.name): settings if has_paths(get_method(m.name)) and (wanted is None or m.label in wanted)
            and (wanted_data is None or d.name in wanted_data) else None for m in methods for d in datasets}


def parse_suite(raw: dict[str, Any], default_name: str = "suite") -> Suite:
    if not isinstance(raw, dict):
        raise ConfigError("a suite file must be a YAML mapping (see configs/suites/smoke.yaml)")
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"unknown top-level suite key(s) {sorted(unknown)}; valid keys: {sorted(SUITE_KEYS)}")
    _check_sections(raw)
    for required in ("datasets", "methods"):
        if not raw.get(required):
            raise ConfigError(f"suite has no {required!r}: list at least one")
    shared_model = raw.get("model") or {}
    shared_model = {"name": shared_model} if isinstance(shared_model, str) else shared_model
    if not isinstance(shared_model, dict):
        raise ConfigError(f"'model' must be a model name or a mapping of model settings, got {shared_model!r}")
    models = raw.get("models") or [{}]
    models = [build_dataclass(ModelSettings, {**shared_model, **(m if isinstance(m, dict) else {"name": m})},
                              f"models[{i}]") for i, m in enumerate(models)]
    seeds = raw.get("seeds", [0])
    _check_seeds(seeds, "seeds")
    num_samples = raw.get("num_samples", 10)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    methods = [_method_entry(m, i) for i, m in enumerate(raw["methods"])]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"method labels must be unique; give repeated methods a 'label': {labels}")
    configs = {m.label: _method_config(m, raw) for m in methods}
    datasets = [_dataset_entry(d, i) for i, d in enumerate(raw["datasets"])]
    for m in methods:
        stray = sorted(set(m.datasets or []) - {d.name for d in datasets})
        if stray:
            raise ConfigError(f"method {m.label!r} lists datasets {stray} that the suite does not have; "
                              f"the suite's datasets: {[d.name for d in datasets]}")
    name = raw.get("name", default_name)
    data = {d.name: build_dataclass(DataSettings, {**(raw.get("data") or {}), **d.data}, f"datasets.{d.name}.data")
            for d in datasets}
    loras = {m.label: _run_lora(configs[m.label], raw) for m in methods}
    paths = _path_settings(raw.get("path"), methods, datasets)
    for model in models:
        check_model_source(model)
    all_seeds = list(dict.fromkeys(seeds + [s for m in methods for s in (m.seeds or [])]))
    runs = [
        RunSpec(name, model, method, configs[method.label], dataset, data[dataset.name], seed, num_samples,
                raw.get("n_bins", 15), loras[method.label],
                paths[method.label, dataset.name])
        for model in models for dataset in datasets for seed in all_seeds for method in methods
        if seed in (method.seeds or seeds) and dataset.name in (method.datasets or [dataset.name])
    ]
    _attach_inputs(runs)
    return Suite(name, raw, runs)


def _attach_inputs(runs: list[RunSpec]) -> None:
    """Each run's inputs: its model's and data's identities and its method's and the metrics' code,
    each computed once per distinct model, (dataset, data settings) and method."""
    models: dict[str, Any] = {}
    data: dict[str, Any] = {}
    code: dict[str, Any] = {}
    evaluation = evaluation_code()
    for spec in runs:
        model_key = content_hash(spec.model)
        if model_key not in models:
            models[model_key] = model_identity(spec.model)
        sets = {}
        for name in [spec.dataset.name, *spec.dataset.ood]:
            data_key = content_hash([name, spec.data])
            if data_key not in data:
                data[data_key] = data_identity(get_task(name), spec.data)
            sets[name] = data[data_key]
        if spec.method.name not in code:
            code[spec.method.name] = method_code(get_method(spec.method.name))
        spec.inputs = {"model": models[model_key], "data": sets,
                       "code": {"method": code[spec.method.name], "evaluation": evaluation}}


def load_suite(path: str | Path, overrides: list[str] | None = None) -> Suite:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"suite file {path} does not exist (see configs/suites/ for examples)")
    if not path.is_file():
        raise ConfigError(f"suite path {path} is not a file; give a suite YAML such as configs/suites/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"suite file {path} is not valid YAML{line}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"suite file {path} is not a text (YAML) file") from None
    return parse_suite(apply_overrides(raw or {}, overrides or []), default_name=path.stem)
