"""The shared prediction path: run a per-batch sampler over a loader, count its cost, return a Predictive."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .backbone import Backbone
from .predictive import Cost, Predictive

BatchSampler = Callable[[dict[str, Any]], torch.Tensor]
"""batch -> (B, S, K) class logits."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def collect_predictive(backbone: Backbone, loader: DataLoader, sample_batch: BatchSampler,
                       desc: str = "predict", progress: bool = True) -> Predictive:
    """Concatenate ``sample_batch`` over ``loader`` under inference mode; cost = backbone passes per example."""
    if backbone.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backbone.device)
    start_passes = backbone.num_forward_passes
    start = time.perf_counter()
    logits, labels, ids = [], [], []
    with torch.inference_mode():
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
