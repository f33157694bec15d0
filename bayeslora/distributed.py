"""Data-parallel training across the processes that ``accelerate launch --multi_gpu`` or ``torchrun`` starts.

With N > 1 processes every process executes the same runs in the same order. The training loop gives
process p the minibatches p, p + N, p + 2N, ... of the identically seeded loader and averages the
trainable parameters' gradients over the processes before each optimiser step, so one step sees N
minibatches and every process keeps the same weights (what DistributedDataParallel computes; here the
all-reduce runs after backward instead of overlapping it). Only the main process writes files (run
folders, caches, results); the others compute the same runs and discard what they would write.
accelerate's ``PartialState`` sets up the process group (NCCL on GPUs, gloo on CPU) and the device of
each process. With one process every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@lru_cache(maxsize=1)
def _state() -> Any:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, NCCL on GPUs


def world_size() -> int:
    state = _state()
    return 1 if state is None else int(state.num_processes)


def rank() -> int:
    state = _state()
    return 0 if state is None else int(state.process_index)


def is_main_process() -> bool:
    return rank() == 0


def device() -> torch.device | None:
    """This process's device when several processes run (``cuda:<local rank>`` or cpu), else None."""
    state = _state()
    return None if state is None else torch.device(state.device)


def barrier() -> None:
    state = _state()
    if state is not None:
        state.wait_for_everyone()


def shard_batches(batches: Iterable[tuple[float, T]]) -> Iterator[tuple[float, T]]:
    """(epoch, batch) pairs for this process: of each group of N consecutive pairs, process p takes the
    p-th batch and the group's epoch (its last pair's), so every process sees the same epoch boundaries
    (validation and early stopping stay in step). A trailing incomplete group is dropped."""
    n, p = world_size(), rank()
    if n == 1:
        yield from batches
        return
    group: list[tuple[float, T]] = []
    for pair in batches:
        group.append(pair)
        if len(group) == n:
            yield group[-1][0], group[p][1]
            group = []


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """grad <- mean over processes of grad, for every parameter that has one (one flat all-reduce)."""
    n = world_size()
    if n == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= n
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
