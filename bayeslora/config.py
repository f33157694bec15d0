"""Dataclass settings shared by the backbone, data, training loop and runner, and a strict builder.

``build_dataclass`` turns a (YAML) mapping into a dataclass, recursing into nested dataclasses and
rejecting unknown keys with the list of valid ones, so a typo in a suite never passes silently.

Every settings class (and every method's ``Config``) derives from :class:`Validated`: at construction
each field is checked against its type hint (``int`` refuses ``2.5`` and ``True``, ``Literal`` lists the
valid choices, ``Annotated[float, POSITIVE]`` carries a :class:`Range`), then the class's own
``check()`` runs for rules across fields. So a bad setting fails when the suite is parsed, before any
model loads, with one line naming the field and what it must be.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number field, used as ``Annotated[float, Range(gt=0)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: float) -> str | None:
        bounds = [(self.ge, ">=", value >= (self.ge or 0)), (self.gt, ">", value > (self.gt or 0)),
                  (self.le, "<=", value <= (self.le or 0)), (self.lt, "<", value < (self.lt or 0))]
        failed = [f"{op} {bound:g}" for bound, op, ok in bounds if bound is not None and not ok]
        if failed or (isinstance(value, float) and math.isnan(value)):
            wanted = " and ".join(f"{op} {bound:g}" for bound, op, _ in bounds if bound is not None)
            return f"must be {wanted}"
        return None


POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
FRACTION = Range(ge=0, lt=1)
UNIT = Range(ge=0, le=1)
PositiveInt = Annotated[int, POSITIVE]
NonNegativeInt = Annotated[int, NON_NEGATIVE]
PositiveFloat = Annotated[float, POSITIVE]
NonNegativeFloat = Annotated[float, NON_NEGATIVE]
Fraction = Annotated[float, FRACTION]
"""A rate in [0, 1) (dropout, validation share)."""


class FieldError(ConfigError):
    """A field's value does not fit its type or range; ``field`` names it, ``problem`` says what it must be."""

    def __init__(self, owner: str, field_name: str, problem: str):
        self.owner, self.field, self.problem = owner, field_name, problem
        super().__init__(f"{owner}.{field_name} {problem}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def type_problem(tp: Any, value: Any) -> str | None:
    """Why ``value`` does not fit type hint ``tp`` ("must be ..."), or None when it does."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return None
    if origin is Annotated:
        inner, *meta = typing.get_args(tp)
        problem = type_problem(inner, value)
        if problem is None:
            for m in meta:
                if isinstance(m, Range) and (problem := m.problem(value)) is not None:
                    break
        return problem
    if origin is Literal:
        ok = any(value == a and type(value) is type(a) for a in typing.get_args(tp))
        return None if ok else f"must be {_type_name(tp)}"
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if value is None:
            return None if type(None) in args else f"must be {_type_name(tp)}"
        problems = [type_problem(a, value) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        # one non-null member whose type fits but whose range does not: say the range
        fitting = [p for a, p in zip([a for a in args if a is not type(None)], problems, strict=True)
                   if type_problem(_strip_annotated(a), value) is None]
        return fitting[0] if fitting else f"must be {_type_name(tp)}"
    if tp is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if tp is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "must be an integer"
    if tp is float:
        return None if isinstance(value, numbers.Real) and not isinstance(value, bool) else "must be a number"
    if tp is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"must be {_type_name(tp)}"
        args = typing.get_args(tp)
        if args and args[0] is not Any:
            bad = [v for v in value if type_problem(args[0], v) is not None]
            if bad:
                return f"must be {_type_name(tp)} (got the element {bad[0]!r})"
        return None
    if origin is dict or tp is dict:
        return None if isinstance(value, dict) else "must be a mapping"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return None if isinstance(value, tp) else f"must be a mapping of {tp.__name__} settings"
    return None


def _strip_annotated(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def validate(obj: Any) -> None:
    """Check every field of dataclass ``obj`` against its type hint (:func:`type_problem`), then run
    ``obj.check()`` if the class defines one. Raises FieldError / ConfigError naming the field."""
    cls = type(obj)
    try:
        hints = _hints(cls)
    except (NameError, TypeError):  # hints that cannot be resolved (a plugin's forward references): skip types
        hints = {}
    for f in dataclasses.fields(obj):
        if f.name in hints:
            problem = type_problem(hints[f.name], getattr(obj, f.name))
            if problem is not None:
                raise FieldError(getattr(cls, "config_name", cls.__name__), f.name,
                                 f"{problem}, got {getattr(obj, f.name)!r}")
    check = getattr(obj, "check", None)
    if callable(check):
        check()


class Validated:
    """Base of settings dataclasses: :func:`validate` runs at construction. ``config_name`` (a class
    attribute, e.g. "train") names the suite section in errors; the class name otherwise."""

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class ModelSettings(Validated):
    """Which causal LM to load.

    ``name`` is a known alias (``smollm2-135m``), a Hugging Face hub id or a local directory.
    ``dtype``: auto (bf16 on GPU, float32 on CPU), float32, bfloat16 or float16.
    ``random_init`` builds an untrained model from a small config in code (tests, timing).
    ``trunk_cache``: auto (when every adapter sits in layers >= L, layers < L are computed once per
    prompt and reused; see :mod:`bayeslora.trunk`) or off (always the full forward).
    ``compile``: ``torch.compile`` each decoder layer (dynamic shapes); measured in benchmarks/RESULTS.md.
    """

    config_name: ClassVar[str] = "model"

    name: str = "smollm2-135m"
    """A bundled alias, a hub alias (``bayeslora.model_source.HUB_ALIASES``), a hub id (org/name) or a folder."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype: auto (bf16 on GPU, float32 on CPU)."""
    device: str = "auto"
    """auto (this process's GPU if any, else CPU), cpu, cuda or cuda:<i>."""
    revision: str | None = None
    """The hub commit or tag to load (pin it: run ids record it)."""
    load_in_bits: Literal[4, 8] | None = None
    """4/8-bit weights through bitsandbytes (CUDA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory."""
    max_length: PositiveInt = 512
    """Prompt tokens kept (a passage is cut from its start; the question never)."""
    random_init: dict[str, Any] | None = None
    """An untrained llama/qwen2 from config fields in code (arch, hidden_size, ..., tokenizer, seed)."""
    trunk_cache: Literal["auto", "off"] | bool = "auto"
    """auto: frozen layers below the lowest adapted one computed once per prompt; off: full forward."""
    compile: bool = False
    """torch.compile each decoder layer."""

    def check(self) -> None:
        if not self.name.strip():
            raise FieldError("model", "name", "must name a model (an alias, a hub id or a local folder)")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise FieldError("model", "device", f"must be auto, cpu, cuda or cuda:<index>, got {self.device!r}") \
                    from None


RESULT_NEUTRAL_MODEL_FIELDS = ("device", "trunk_cache", "compile")
"""ModelSettings fields that change how a model runs, not what it computes: kept out of run ids and
artifact keys, so switching them reuses finished runs and cached adapters."""


@dataclass
class LoraSettings(Validated):
    """LoRA on ``target_modules`` (peft). ``layers``: None (all), a list of indices, or {"top": N}."""

    config_name: ClassVar[str] = "lora"

    r: PositiveInt = 8
    """Rank of A (r x d_in) and B (d_out x r)."""
    alpha: PositiveFloat = 16.0
    """Scale: the update is (alpha / r) B A."""
    dropout: Fraction = 0.1
    """LoRA dropout on the adapter's input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names to adapt in every chosen layer."""
    layers: list[NonNegativeInt] | dict[str, PositiveInt] | None = None
    """None (all), a list of layer indices, or {top: N}."""

    def check(self) -> None:
        if not self.target_modules:
            raise FieldError("lora", "target_modules", "must list at least one module name, e.g. [q_proj, v_proj]")
        if isinstance(self.layers, dict) and set(self.layers) != {"top"}:
            raise FieldError("lora", "layers", f"must be a list of indices or {{top: N}}, got {self.layers!r}")


@dataclass
class TrainSettings(Validated):
    """The one fine-tuning loop's settings (AdamW, linear warm-up/decay, clipping, early stopping).

    ``keep``: which trainable state the loop returns when it has a validation split. ``best_val``: the
    evaluated epoch with the lowest validation NLL (early-stopping selection; validation NLL is
    checked after every epoch); ``last``: the state after the final step, as fixed-budget fine-tuning
    (the setting of the Laplace-LoRA and BLoB papers, where MAP ends overconfident).
    """

    config_name: ClassVar[str] = "train"

    epochs: PositiveFloat = 1.0
    """Passes over the training split (fractions allowed)."""
    max_steps: PositiveInt | None = None
    """A fixed budget of optimiser steps that replaces ``epochs`` (the published protocols', e.g. 5,000)."""
    lr: PositiveFloat = 1e-4
    """AdamW's peak learning rate."""
    batch_size: PositiveInt = 8
    """Examples per minibatch."""
    grad_accum: PositiveInt = 1
    """Minibatches per optimiser step."""
    weight_decay: NonNegativeFloat = 1e-2
    """AdamW's decoupled weight decay."""
    warmup_ratio: Fraction = 0.06
    """Share of the steps with a linear warm-up."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after the warm-up."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradient-norm clipping threshold."""
    early_stopping_patience: NonNegativeInt | None = None
    """Stop after more than this many evaluations without a better validation NLL (None: never)."""
    keep: Literal["best_val", "last"] = "best_val"
    """Which state the loop returns (see above)."""
    eval_batch_size: PositiveInt = 16
    """Batch size of validation and prediction passes."""
    autocast: Literal["auto", "bf16", "off"] = "auto"
    """bf16 autocast: auto (on GPU only), bf16 (always) or off."""
    progress: bool = True
    """Show a progress bar."""


TRAIN_FIELDS_KEYED_ONLY_OFF_DEFAULT = {"keep": "best_val", "max_steps": None}
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


DATA_FILE_SPLITS = {"train", "val", "test"}


@dataclass
class DataSettings(Validated):
    """Where a task's data comes from and how many examples of each split a run uses (None = all).

    ``source``: ``offline`` (the bundled copies, split by the documented offline protocol),
    ``hub`` (the Hugging Face hub ids in :data:`bayeslora.data.tasks.TASKS`) or ``files`` (local
    jsonl/json/parquet/arrow files or save-to-disk folders in the hub schema, given in ``files``
    as {train: PATH, test: PATH, val: PATH (optional)}).
    """

    config_name: ClassVar[str] = "data"

    max_train: PositiveInt | None = None
    """Keep the first N training examples (None: all)."""
    max_val: PositiveInt | None = None
    """Keep the first N validation examples (None: all)."""
    max_test: PositiveInt | None = None
    """Keep the first N test examples (None: all)."""
    val_fraction: Fraction = 0.1
    """Share of the training pool held out for validation (when the source has no validation split)."""
    split_seed: NonNegativeInt = 0
    """Seed of the permutation that splits and orders the examples."""
    source: Literal["offline", "hub", "files"] = "offline"
    """offline (bundled copies), hub (Hugging Face ids) or files (``files``)."""
    files: dict[str, str] | None = None
    """{train: PATH, test: PATH, val: PATH (optional)} for source files."""
    revision: str | None = None
    """The hub dataset's commit or tag (source hub), recorded in run ids."""

    def check(self) -> None:
        if self.files is not None:
            bad = sorted(set(self.files) - DATA_FILE_SPLITS)
            if bad:
                raise FieldError("data", "files", f"has unknown split(s) {bad}; valid: train, val (optional), test")
            if not all(isinstance(v, str) and v for v in self.files.values()):
                raise FieldError("data", "files", f"must map splits to file paths, got {self.files!r}")
        if self.source == "files" and (not self.files or not {"train", "test"} <= set(self.files)):
            raise FieldError("data", "files", "must give at least train and test paths when data.source is files")


@dataclass
class AdapterConfig(Validated):
    """LoRA + training settings of a method that trains adapters; the runner fills both from the
    suite's ``lora:`` and ``train:`` sections (method-level overrides win)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapter: the suite's ``lora:`` with the method's overrides."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Its training: the suite's ``train:`` with the method's overrides."""


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
    """Instantiate dataclass ``cls`` from ``values``; unknown keys, values of the wrong type or out of
    range raise ConfigError naming ``where`` and the field."""
    if values is None:
        values = {}
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
        obj = cls(**kwargs)
        if not isinstance(obj, Validated):  # a plugin's plain dataclass: the same checks
            validate(obj)
        return obj
    except FieldError as exc:
        raise ConfigError(f"{where}.{exc.field} {exc.problem}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
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
