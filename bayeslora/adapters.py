"""Training LoRA adapters by cross-entropy on the answer logits, and the shared MAP-adapter cache.

A MAP adapter for (model, lora settings, train settings, tokenised training data, seed) is trained
once and then reused by every method that starts from it (MAP itself, Laplace, ensembles, curve
anchors, temperature scaling, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .artifacts import ArtifactStore
from .backbone import Backbone
from .config import RESULT_NEUTRAL_MODEL_FIELDS, LoraSettings, TrainSettings, to_plain, train_key
from .data import EncodedSplit
from .identity import source_digest
from .posterior import FitReport
from .predict import predict_with_weights
from .predictive import Predictive
from .profiling import built_on_training, filling_cache
from .training import TrainingHooks, TrainResult, train_seeded


class ClassifierHooks(TrainingHooks):
    """Cross-entropy on the active adapter's answer logits: L = -mean log softmax(z)_y."""

    def __init__(self, backbone: Backbone, params: dict[str, torch.nn.Parameter]):
        self.backbone = backbone
        self.params = params

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.params.values())}]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.backbone.class_logits(batch)

    def step_context(self) -> AbstractContextManager[Any]:
        return self.backbone.training_mode()

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        logits = self.logits(batch)
        return F.cross_entropy(logits, batch["labels"].to(logits.device))

    def val_nll(self, loader: DataLoader) -> float:
        total, n = 0.0, 0
        with torch.inference_mode():
            for batch in loader:
                logits = self.logits(batch)
                total += F.cross_entropy(logits, batch["labels"].to(logits.device), reduction="sum").item()
                n += len(batch["labels"])
        return total / max(1, n)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v)


@dataclass
class AdapterFit:
    """A trained (or cache-loaded) adapter on the backbone."""

    name: str
    trainable_params: int
    result: TrainResult
    reused: bool


def map_adapter_key(backbone: Backbone, lora: LoraSettings, settings: TrainSettings, train_split: EncodedSplit,
                    val_split: EncodedSplit | None, seed: int,
                    hooks_cls: type[ClassifierHooks] = ClassifierHooks) -> dict[str, Any]:
    """Everything a MAP adapter depends on (progress-bar flags excluded): the model and its weight files,
    the settings, the tokenised data, the seed and the training code (this module's and the hooks')."""
    train_cfg = train_key(to_plain(settings), neutral=("progress", "eval_batch_size"))
    packages = tuple(sorted({hooks_cls.__module__.split(".")[0], "bayeslora"}))
    return {
        "model": backbone.model_id,
        "model_source": backbone.source_identity,
        "code": [source_digest(__name__), source_digest(hooks_cls.__module__, packages)],
        "model_settings": {k: v for k, v in to_plain(backbone.settings).items()
                           if k not in RESULT_NEUTRAL_MODEL_FIELDS},
        "lora": to_plain(lora),
        "train": train_cfg,
        "train_data": train_split.fingerprint,
        "val_data": val_split.fingerprint if val_split is not None else None,
        "seed": seed,
    }


def fit_lora_adapter(backbone: Backbone, name: str, lora: LoraSettings, settings: TrainSettings,
                     train_split: EncodedSplit, val_split: EncodedSplit | None, seed: int,
                     artifacts: ArtifactStore | None = None, hooks_cls: type[ClassifierHooks] = ClassifierHooks,
                     cache_kind: str | None = "map_adapter") -> AdapterFit:
    """Add adapter ``name`` and train it by CE (AdamW; weight decay from ``settings``), or load it from
    ``artifacts`` when an adapter with the same key was trained before."""
    backbone.add_lora(name, lora, seed=seed, answer_ids=train_split.answer_ids)
    params = backbone.lora_parameters(name)
    n_params = sum(p.numel() for p in params.values())
    key = map_adapter_key(backbone, lora, settings, train_split, val_split, seed, hooks_cls) if cache_kind else None
    if artifacts is not None and key is not None:
        cached = artifacts.get(cache_kind, key)
        if cached is not None:
            backbone.load_adapter_state(name, cached["adapter"])
            built_on_training(cached["result"]["seconds"])
            return AdapterFit(name, n_params, TrainResult(**cached["result"]), reused=True)
    with filling_cache(cache_kind) if key is not None else contextlib.nullcontext([None]) as charged:
        result = train_seeded(lambda _: hooks_cls(backbone, params), train_split, val_split, settings, seed,
                              backbone.device, desc=f"train {name}")
    if key is not None:
        if charged[0] is not None:  # recorded without the trunk states other runs share
            result = dataclasses.replace(result, seconds=charged[0])
        built_on_training(result.seconds)
    if artifacts is not None and key is not None:
        record = {"steps": result.steps, "epochs": result.epochs, "seconds": result.seconds,
                  "best_val_nll": result.best_val_nll, "history": result.history, "tokens": result.tokens}
        artifacts.save(cache_kind, key, {"adapter": backbone.adapter_state(name), "result": record})
    return AdapterFit(name, n_params, result, reused=False)


class MapAdapter:
    """The (cached) MAP adapter a posterior starts from, held by composition.

    ``fit`` trains it through the shared loop with the owner's ``lora`` and ``train`` settings (``train``'s
    weight decay replaced by ``weight_decay`` when given), or loads the cached adapter with the same key;
    ``use`` activates it; ``state`` / ``restore`` carry its weights through the owner's state_dict and
    load_state_dict. It is named by its owner (``name``, default the owner's ``adapter_name``), so the
    owner's ``release()`` deletes it.
    """

    def __init__(self, owner: Any, weight_decay: float | None = None, name: str | None = None,
                 seed: int | None = None):
        self.owner = owner
        self.weight_decay = weight_decay
        self.name = name or owner.adapter_name
        self.seed = owner.seed if seed is None else seed

    def train_settings(self) -> TrainSettings:
        train = self.owner.config.train
        return train if self.weight_decay is None else dataclasses.replace(train, weight_decay=self.weight_decay)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val_split: EncodedSplit | None) -> AdapterFit:
        """Train (or load from the owner's artifact store) the adapter on ``backbone``."""
        self.owner.attach_for_training(backbone)
        return fit_lora_adapter(backbone, self.name, self.owner.config.lora, self.train_settings(), train_split,
                                val_split, self.seed, self.owner.artifacts)

    def use(self) -> Backbone:
        """The owner's backbone with this adapter active."""
        backbone = self.owner.require_backbone()
        backbone.use_adapter(self.name)
        return backbone

    def state(self) -> dict[str, torch.Tensor]:
        return self.owner.require_backbone().adapter_state(self.name)

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.owner.require_backbone().restore_adapter(self.name, self.owner.config.lora, state)

    def predict_around(self, loader: DataLoader, num_samples: int,
                       noise: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Predictive:
        """(N, S, K) logits under theta_s = theta_MAP + noise(theta_MAP, generator) for s = 1..S, one
        backbone pass per sample (nothing is written into the model). The generator is CPU, seeded by
        the owner's seed, so the draws repeat across devices."""
        backbone, mean = self.use(), self.state()
        gen = torch.Generator().manual_seed(self.seed)
        draws = [{k: (w + noise(w.cpu(), gen).to(w.dtype).to(w.device)) for k, w in mean.items()}
                 for _ in range(num_samples)]
        return predict_with_weights(backbone, self.name, draws, loader, self.owner.name)


def map_fit_report(fit: AdapterFit) -> FitReport:
    """What training (or loading) one MAP adapter cost, as a FitReport the owner extends."""
    return FitReport(trainable_params=fit.trainable_params, posterior_params=0, train_steps=fit.result.steps,
                     reused_cache=fit.reused,
                     extra={"best_val_nll": fit.result.best_val_nll, "train_tokens": fit.result.tokens,
                            "train_peak_mem_mb": fit.result.peak_mem_mb})
