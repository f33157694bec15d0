"""Dataclass settings shared by the backbone, data, training loop and runner, and a strict builder.

``build_dataclass`` turns a (YAML) mapping into a dataclass, recursing into nested dataclasses and
rejecting unknown keys with the list of valid ones, so a typo in a suite never passes silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class ModelSettings:
    """Which causal LM to load.

    ``name`` is a known alias (``smollm2-135m``), a Hugging Face hub id or a local directory.
    ``dtype``: auto (bf16 on GPU, float32 on CPU), float32, bfloat16 or float16.
    ``random_init`` builds an untrained model from a small config in code (tests, timing).
    ``trunk_cache``: auto (when every adapter sits in layers >= L, layers < L are computed once per
    prompt and reused; see :mod:`bayeslora.trunk`) or off (always the full forward).
    ``compile``: ``torch.compile`` each decoder layer (dynamic shapes); it did not pay in the measured
    benchmark runs on an H100 (compilation and recompiles outweigh the gain), see RESULTS.md.
    """

    name: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    revision: str | None = None
    load_in_bits: int | None = None
    gradient_checkpointing: bool = False
    max_length: int = 512
    random_init: dict[str, Any] | None = None
    trunk_cache: str = "auto"
    compile: bool = False


RESULT_NEUTRAL_MODEL_FIELDS = ("device", "trunk_cache", "compile")
"""ModelSettings fields that change how a model runs, not what it computes: kept out of run ids and
artifact keys, so switching them reuses finished runs and cached adapters."""


@dataclass
class LoraSettings:
    """LoRA on ``target_modules`` (peft). ``layers``: None (all), a list of indices, or {"top": N}."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | dict[str, int] | None = None


@dataclass
class TrainSettings:
    """The one fine-tuning loop's settings (AdamW, linear warm-up/decay, clipping, early stopping).

    ``keep``: which trainable state the loop returns when it has a validation split. ``best_val``: the
    evaluated epoch with the lowest validation NLL (early-stopping selection; validation NLL is
    checked after every epoch); ``last``: the state after the final step, as fixed-budget fine-tuning
    (the setting of the Laplace-LoRA and BLoB papers, where MAP ends overconfident).
    """

    epochs: float = 1.0
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 1e-2
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    early_stopping_patience: int | None = None
    keep: str = "best_val"
    eval_batch_size: int = 16
    autocast: str = "auto"
    progress: bool = True


TRAIN_FIELDS_KEYED_ONLY_OFF_DEFAULT = {"keep": "best_val"}
"""TrainSettings fields added after results existed, with the default that reproduces the loop from
before: at that default they are left out of run ids and artifact keys (:func:`train_key`), so finished
runs and cached adapters stay valid; any other value is part of the key."""
_TRAIN_FIELD_NAMES = {f.name for f in dataclasses.fields(TrainSettings)} - set(TRAIN_FIELDS_KEYED_ONLY_OFF_DEFAULT)


def train_key(value: Any, neutral: tuple[str, ...] = ()) -> Any:
    """``value`` (plain data) as it enters a run id or artifact key: every TrainSettings mapping in it
    loses the fields named in ``neutral`` (at the top level only) and the later-added fields that sit at
    their old-behaviour default (:data:`TRAIN_FIELDS_KEYED_ONLY_OFF_DEFAULT`, at any depth)."""
    if isinstance(value, list):
        return [train_key(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: train_key(v) for k, v in value.items() if k not in neutral}
    if _TRAIN_FIELD_NAMES <= set(value):
        out = {k: v for k, v in out.items() if TRAIN_FIELDS_KEYED_ONLY_OFF_DEFAULT.get(k, object()) != v}
    return out


@dataclass
class DataSettings:
    """Where a task's data comes from and how many examples of each split a run uses (None = all).

    ``source``: ``offline`` (the bundled copies, split by the documented offline protocol),
    ``hub`` (the Hugging Face hub ids in :data:`bayeslora.data.tasks.TASKS`) or ``files`` (local
    jsonl/json/parquet/arrow files or save-to-disk folders in the hub schema, given in ``files``
    as {train: PATH, test: PATH, val: PATH (optional)}).
    """

    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    source: str = "offline"
    files: dict[str, str] | None = None


@dataclass
class AdapterConfig:
    """LoRA + training settings of a method that trains adapters; the runner fills both from the
    suite's ``lora:`` and ``train:`` sections (method-level overrides win)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)


def check_choice(field_name: str, value: Any, choices: tuple[str, ...]) -> None:
    """A ConfigError naming ``field_name`` and the valid ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(f"{field_name} must be one of {choices}, got {value!r}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dataclass_in(tp: Any) -> type | None:
    if _is_dataclass_type(tp):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if _is_dataclass_type(arg):
                return arg
    return None


def _numeric_type(tp: Any) -> type | None:
    """float or int when ``tp`` is one of them (or Optional of one), else None."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    numeric = [a for a in args if a in (float, int)]
    return numeric[0] if len(numeric) == 1 and bool not in args else None


def _coerce_number(tp: Any, value: Any, where: str) -> Any:
    """YAML 1.1 reads ``3e-3`` (no dot) as a string: turn such strings into the field's number type;
    a string that is not a number, or a bool, is a ConfigError naming the field."""
    kind = _numeric_type(tp)
    if kind is None or value is None:
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got the string {value!r}") from None
        if kind is int:
            if not number.is_integer():
                raise ConfigError(f"{where} must be an integer, got {value!r}")
            return int(number)
        return number
    return value


def build_dataclass(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys raise ConfigError naming ``where``."""
    if values is None:
        return cls()
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}: {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        sub = _dataclass_in(hints.get(key))
        if sub is not None and isinstance(value, dict):
            value = build_dataclass(sub, value, f"{where}.{key}")
        kwargs[key] = _coerce_number(hints.get(key), value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {where}: {exc}") from exc


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples -> dicts/lists, for hashing and YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj
