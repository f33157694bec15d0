"""The posterior interface every method implements: fit -> predict -> (N, S, K) logits."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch.utils.data import DataLoader

from .config import Validated
from .errors import ConfigError
from .predictive import Predictive

if TYPE_CHECKING:
    from .artifacts import ArtifactStore
    from .backbone import Backbone
    from .data import EncodedSplit


@dataclass
class FitReport:
    """What fitting cost and produced. ``extra`` holds method-specific numbers (e.g. tuned prior precision),
    which become ``fit_<key>`` result columns. ``fit_seconds`` is filled in by the runner, which times
    every method's fit alike; methods leave it at 0."""

    fit_seconds: float = 0.0
    trainable_params: int = 0
    posterior_params: int = 0
    train_steps: int = 0
    reused_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResourceNeeds:
    """What one run of a method needs beyond the frozen backbone (counts of numbers, for ``bayeslora plan``).

    ``trainable``: parameters the optimiser updates at one time (each an fp32 value, its gradient and two
    AdamW moments); ``stored``: further fp32 numbers the posterior holds (frozen anchors or ensemble
    members, SWAG moments and deviations, Laplace factors, frozen SVD factors); ``training_runs``:
    trainings of that size one after another (ensemble members, curve anchors + the curve), 0 for none;
    ``predict_passes``: backbone passes per test example (None: S, the suite's ``num_samples``);
    ``fit_stored``: fp32 numbers held only while fitting (K-FAC: one more copy of the factors, the
    batch's, while they are summed); ``curvature_batch`` / ``jacobian_batch``: examples per post-hoc
    pass that differentiates the backbone's K outputs (a curvature fit, a linearised predictive), 0
    for none. Those passes run in eval mode, where checkpointing does not apply: the whole graph is kept."""

    trainable: int = 0
    stored: int = 0
    training_runs: int = 1
    predict_passes: int | None = None
    fit_stored: int = 0
    curvature_batch: int = 0
    jacobian_batch: int = 0


@dataclass
class EmptyConfig(Validated):
    """For methods without hyperparameters."""


class Posterior(abc.ABC):
    """A posterior (or point estimate) over the adapter and/or head of a backbone.

    Subclasses set ``name`` (registry key), ``Config`` (a dataclass of hyperparameters) and a
    one-line ``description``, then implement :meth:`fit`, :meth:`predict`, :meth:`state_dict`
    and :meth:`load_state_dict`. ``artifacts`` (optional) is a shared store where expensive
    intermediate results, such as trained MAP adapters, are cached and reused across methods.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    description: ClassVar[str] = ""
    deterministic: ClassVar[bool] = False
    saves_state: ClassVar[bool] = False
    """True: the runner writes :meth:`state_dict` to the run folder (``posterior.pt``) so that later
    analyses (e.g. ``bayeslora path``) can reload the fitted posterior. Off by default: some states
    (Kronecker factors on a 7B model) take gigabytes."""
    adapts_lm_head: ClassVar[bool] = True
    """Whether ``lm_head`` may be among ``lora.target_modules`` (the answer-head LoRA of peft-based
    adapters); methods with adapters of their own (forward-hook adapters) set it False and are refused
    such settings at parse."""
    supports_gradient_checkpointing: ClassVar[bool] = True
    """False where the training forward depends on state that the backward's recomputation of a
    checkpointed layer does not see (weights swapped in by ``functional_call``, forward hooks or
    noise from a private generator that exist only during the forward): such a method's fit refuses
    a checkpointed backbone rather than train on wrong gradients; the runner fits it inside
    :meth:`Backbone.gradient_checkpointing_paused`. Attaching to predict is always allowed."""

    def __init__(self, config: Any = None, *, seed: int = 0, artifacts: ArtifactStore | None = None):
        self.config = self.make_config(config)
        self.seed = seed
        self.artifacts = artifacts
        self.backbone: Backbone | None = None

    @classmethod
    def make_config(cls, config: Any = None) -> Any:
        """Build ``cls.Config`` from None, a dict or an instance; unknown keys fail with the valid ones."""
        if config is None:
            return cls.check_lm_head(cls.Config())
        if isinstance(config, cls.Config):
            return cls.check_lm_head(config)
        if not isinstance(config, dict):
            raise ConfigError(f"config of method {cls.name!r} must be a mapping, got {type(config).__name__}")
        from .config import build_dataclass

        return cls.check_lm_head(build_dataclass(cls.Config, config, where=f"methods.{cls.name}.config"))

    @classmethod
    def check_lm_head(cls, config: Any) -> Any:
        """``config``, unless it asks for an lm_head LoRA this method cannot train (:attr:`adapts_lm_head`)."""
        lora = getattr(config, "lora", None)
        if not cls.adapts_lm_head and lora is not None and "lm_head" in getattr(lora, "target_modules", []):
            raise ConfigError(f"method {cls.name!r} builds its own adapter on layer modules and cannot adapt "
                              f"lm_head; give it lora.target_modules without lm_head (now {lora.target_modules})")
        return config

    def attach(self, backbone: Backbone) -> Posterior:
        """Bind to a backbone (call it before load_state_dict on a fresh instance)."""
        self.backbone = backbone
        return self

    def attach_for_training(self, backbone: Backbone) -> Posterior:
        """:meth:`attach`, first refusing a checkpointed backbone that this method cannot train on
        (see :attr:`supports_gradient_checkpointing`); fit does this."""
        if not self.supports_gradient_checkpointing and backbone.gradient_checkpointing_active:
            raise ConfigError(
                f"method {self.name!r} does not support gradient checkpointing: its training forward uses "
                "weights or hooks that the checkpointed recomputation would not see. Fix: fit it inside "
                "`with backbone.gradient_checkpointing_paused():` (the runner does), or load the model "
                "with model.gradient_checkpointing=false.")
        return self.attach(backbone)

    def require_backbone(self) -> Backbone:
        if self.backbone is None:
            raise RuntimeError(
                f"{type(self).__name__} has no backbone: call fit(backbone, ...) or attach(backbone) first"
            )
        return self.backbone

    @abc.abstractmethod
    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        """Train or fit the posterior; may reuse cached MAP adapters from ``self.artifacts``."""

    @abc.abstractmethod
    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        """Return S = num_samples (or 1 for deterministic methods) class-logit samples per example."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict again after :meth:`attach` on an equal backbone."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @property
    def adapter_name(self) -> str:
        """The name of this posterior's adapter on the backbone, ``<method>-seed<seed>``. Every adapter the
        posterior adds is named by it, alone or extended (:meth:`owned_adapter`), and so owned by it."""
        return f"{self.name}-seed{self.seed}"

    def owned_adapter(self, part: str) -> str:
        """The name of a further adapter this posterior owns: ``<adapter_name>-<part>`` (e.g. ensemble members)."""
        return f"{self.adapter_name}-{part}"

    def release(self) -> None:
        """Delete every adapter this posterior owns (named by :attr:`adapter_name`) from its backbone, so the
        next run in the process starts clean. The runner calls it after each run; methods do not override it."""
        if self.backbone is None:
            return
        for name in self.backbone.adapter_names():
            if name == self.adapter_name or name.startswith(f"{self.adapter_name}-"):
                self.backbone.delete_adapter(name)

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """Counts for :class:`ResourceNeeds` from module shapes only (``backbone`` may live on the meta
        device). Default: one LoRA adapter of ``config.lora`` trained by the shared loop (none without
        ``lora``), S passes per example (1 for deterministic methods). Methods override it."""
        from .backbone import lora_parameter_count
        from .config import LoraSettings

        lora = getattr(config, "lora", None)
        trainable = lora_parameter_count(backbone, lora, num_classes) if isinstance(lora, LoraSettings) else 0
        return ResourceNeeds(trainable=trainable, training_runs=int(trainable > 0),
                             predict_passes=1 if cls.deterministic else None)

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)
