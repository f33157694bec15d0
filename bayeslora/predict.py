"""The shared prediction path: run a per-batch sampler over a loader, count its cost, return a Predictive.

Weight-sampling methods (ensembles, MC dropout, variational and Laplace samples, curves) describe
one posterior sample as a context in which the backbone computes it; :func:`sample_class_logits`
draws S of them over a tokenised batch, optionally several per batched forward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .backbone import Backbone
from .predictive import Cost, Predictive
from .profiling import peak_memory_mb, phase, reset_peak_memory

BatchSampler = Callable[[dict[str, Any]], torch.Tensor]
"""batch -> (B, S, K) class logits."""


def collect_predictive(backbone: Backbone, loader: DataLoader, sample_batch: BatchSampler,
                       desc: str = "predict", progress: bool = True, inference_mode: bool = True) -> Predictive:
    """Concatenate ``sample_batch`` over ``loader``; cost = backbone passes per example.

    Runs under inference mode unless ``inference_mode`` is False (samplers that need autograd,
    e.g. the Jacobians of a linearised predictive, then manage gradients themselves)."""
    reset_peak_memory(backbone.device)
    start_passes = backbone.num_forward_passes
    start = time.perf_counter()
    logits, labels, ids = [], [], []
    with torch.inference_mode(inference_mode), phase("predict"):
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            out = sample_batch(batch)
            if out.ndim != 3 or out.shape[0] != len(batch["example_ids"]):
                raise RuntimeError(f"{desc}: sampler returned shape {tuple(out.shape)}, expected (B, S, K)")
            logits.append(out.float().cpu())
            labels.append(batch["labels"])
            ids.extend(batch["example_ids"])
    n = len(ids)
    cost = Cost(
        forward_passes=round((backbone.num_forward_passes - start_passes) / max(1, n)),
        wall_seconds=time.perf_counter() - start,
        peak_mem_mb=peak_memory_mb(backbone.device),
    )
    return Predictive(torch.cat(logits), torch.cat(labels), ids, cost)


def predict_with_weights(backbone: Backbone, adapter: str, draws: list[dict[str, torch.Tensor]], loader: DataLoader,
                         desc: str) -> Predictive:
    """(N, S, K): every example under each of the S LoRA weight sets ``draws`` of ``adapter``
    (:meth:`Backbone.class_logits_with`; nothing is written into the model). S backbone passes."""
    def sample(batch: dict[str, Any]) -> torch.Tensor:
        return torch.stack([backbone.class_logits_with(adapter, weights, batch) for weights in draws], dim=1)

    return collect_predictive(backbone, loader, sample, desc=desc)


SampleContext = Callable[[int], AbstractContextManager[Any]]
"""s -> a context in which the backbone computes posterior sample s (sets weights, noise, ...)."""


PER_EXAMPLE_KEYS = ("input_ids", "attention_mask", "labels", "choice_mask")


def repeat_batch(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """The batch stacked ``times`` times along the batch axis (per-example tensors only)."""
    if times == 1:
        return batch
    return {k: torch.cat([v] * times) if k in PER_EXAMPLE_KEYS else v for k, v in batch.items()}


def sample_class_logits(backbone: Backbone, batch: dict[str, Any], num_samples: int,
                        sample_context: SampleContext | None = None, samples_per_forward: int = 1,
                        logits: Callable[[dict[str, Any]], torch.Tensor] | None = None) -> torch.Tensor:
    """(B, S, K) logits z_s(x), s = 1..S, over one tokenised batch (no re-tokenising); ``logits`` is the
    batch -> (B, K) function (default ``backbone.class_logits``).

    With ``samples_per_forward`` = k > 1 the batch is stacked k times and k samples come from one
    batched forward; use it only where the randomness is drawn per row (dropout masks, Flipout
    signs), since the k stacked copies share one ``sample_context``.
    """
    if num_samples < 1 or samples_per_forward < 1:
        raise ValueError("num_samples and samples_per_forward must be positive")
    size = batch["input_ids"].shape[0]
    chunks = []
    for start in range(0, num_samples, samples_per_forward):
        reps = min(samples_per_forward, num_samples - start)
        with sample_context(start) if sample_context is not None else contextlib.nullcontext():
            z = (logits or backbone.class_logits)(repeat_batch(batch, reps))
        chunks.append(z.view(reps, size, -1).transpose(0, 1))
    return torch.cat(chunks, dim=1)
