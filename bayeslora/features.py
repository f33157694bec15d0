"""Feature cache for head-only posteriors (last-layer Laplace, VBLL, ...).

phi(x) = h_T(x), the last-position hidden state after the final norm, depends only on the model's
weights, the active adapter's weights and the prompt's tokens. For methods whose uncertainty lives
in the answer head, phi is computed once per split and reused for every epoch of head training,
every prior-precision trial and every posterior sample. The cache key hashes the base weights, the
adapter's weights and the tokenised split, so retraining an adapter or changing the template makes
a new entry rather than reading a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .artifacts import ArtifactStore
from .backbone import Backbone, align_answer_columns, mask_choices
from .data import EncodedSplit, make_loader
from .identity import source_digest
from .profiling import filling_cache, phase
from .trunk import update_weight_digest

FEATURE_KEYS = ("features", "labels", "choice_mask")


@dataclass
class FeatureSet(Dataset):
    """phi(x) (N, H) float32 with the labels, option masks (N, K) and answer-token ids (K,) of a split."""

    features: torch.Tensor
    labels: torch.Tensor
    choice_mask: torch.Tensor
    answer_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[i], "labels": self.labels[i], "choice_mask": self.choice_mask[i]}

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def loader(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """Batches {"features", "labels", "choice_mask", "answer_ids"}; with shuffle, the order is fixed by ``seed``."""
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=self._collate)

    def _collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([r[k] for r in rows]) for k in FEATURE_KEYS}
        batch["answer_ids"] = self.answer_ids
        return batch


def feature_batch(backbone: Backbone, batch: dict[str, Any]) -> dict[str, Any]:
    """A tokenised batch as a feature batch: one backbone pass (no gradients) per example."""
    with torch.no_grad():
        features = backbone.features(batch)
    return {"features": features, "labels": batch["labels"], "choice_mask": batch["choice_mask"],
            "answer_ids": batch["answer_ids"]}


def same_answers(fitted: torch.Tensor, batch: dict[str, Any]) -> bool:
    return torch.equal(batch["answer_ids"].cpu(), fitted.cpu())


def fitted_choice_mask(fitted: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """The choice mask over a head's fitted answer columns: the batch's own for a set with the same answer
    tokens; else all options present (the set's options are masked after :func:`to_set_answers`)."""
    if same_answers(fitted, batch):
        return batch["choice_mask"]
    return torch.ones(len(batch["labels"]), len(fitted), dtype=torch.bool)


def to_set_answers(samples: torch.Tensor, fitted: torch.Tensor, batch: dict[str, Any], features: torch.Tensor,
                   backbone: Backbone) -> torch.Tensor:
    """(B, S, K_set) logit samples for a set's answers from a head's (B, S, K_fit) samples over the answer tokens
    ``fitted``: an answer the head was fitted on takes that column; another keeps the LM head's logit
    (pretrained row, plus the active adapter's lm_head LoRA, which has no row for it either), the same in every
    sample, since the posterior says nothing about it. Options an example lacks are masked. Unchanged for a
    set with the fitted answers."""
    if same_answers(fitted, batch):
        return samples
    pretrained = backbone.head_logits(features, batch, masked=False).to(samples.device)
    out = align_answer_columns(samples, fitted, batch["answer_ids"], pretrained[:, None, :])
    return mask_choices(out, batch["choice_mask"].to(out.device)[:, None])


def adapter_context(backbone: Backbone, adapter: str | None) -> contextlib.AbstractContextManager[Any]:
    """Adapter ``adapter`` active, or (None) every adapter disabled: the frozen pretrained model."""
    return backbone.adapters_disabled() if adapter is None else backbone.using_adapter(adapter)


def compute_features(backbone: Backbone, split: EncodedSplit, batch_size: int, adapter: str | None) -> FeatureSet:
    """phi(x) for every example of ``split`` under ``adapter`` (see :func:`adapter_context`)."""
    chunks = []
    with adapter_context(backbone, adapter):
        for batch in make_loader(split, batch_size):
            chunks.append(feature_batch(backbone, batch))
    return FeatureSet(torch.cat([c["features"] for c in chunks]).cpu(),
                      torch.cat([c["labels"] for c in chunks]).cpu(),
                      torch.cat([c["choice_mask"] for c in chunks]).cpu(),
                      split.answer_ids.cpu())


def weights_fingerprint(backbone: Backbone, adapter: str | None) -> str:
    """Hash of everything phi depends on besides the tokens: architecture, dtype, every base weight
    (strided samples) and, if ``adapter`` is given, every weight of that adapter (in full)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{backbone.model_id}|{backbone.lm.config.model_type}|{backbone.dtype}".encode())
    update_weight_digest(h, ((n, p) for n, p in backbone.lm.named_parameters() if "lora_" not in n))
    if adapter is not None:
        for name, tensor in sorted(backbone.adapter_state(adapter).items()):
            h.update(f"{name}:{tuple(tensor.shape)}".encode())
            h.update(tensor.double().numpy().tobytes())
    return h.hexdigest()


def cached_features(backbone: Backbone, split: EncodedSplit, batch_size: int, adapter: str | None,
                    artifacts: ArtifactStore | None = None) -> FeatureSet:
    """:func:`compute_features`, loaded from ``artifacts`` (kind "features") when the same weights
    and tokenised split were seen before, and stored there otherwise."""
    with phase("features"):
        key = {"weights": weights_fingerprint(backbone, adapter), "data": split.fingerprint,
               "source": backbone.source_identity, "code": source_digest(__name__)}
        if artifacts is not None:
            stored = artifacts.get("features", key)
            if stored is not None:
                return FeatureSet(**stored)
        with filling_cache("features"):
            features = compute_features(backbone, split, batch_size, adapter)
        if artifacts is not None:
            artifacts.save("features", key, vars(features))
        return features
