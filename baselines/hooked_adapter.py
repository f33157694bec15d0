"""Adapters that add a low-rank update to target modules' outputs through forward hooks.

``y = module(x) + update(key, x)``: the update is added by ``register_forward_hook`` (PyTorch's
module-hook API) inside :meth:`HookedAdapter.active` and removed on exit, so the model and any peft
adapters on it stay untouched. Used by PoLAR (:mod:`baselines.polar`), BLoB, Bayesian-LoRA and LoRA-XS
(:mod:`baselines.lora_xs`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bayeslora.backbone import LAYER_INDEX, Backbone, align_answer_columns, mask_choices

HEAD_KEY = "answer_head"
"""The key of an adapter's answer-head part (the K rows of ``head_ids``) next to its modules' keys."""


class HookedAdapter(nn.Module):
    """Base class: subclasses define :meth:`update` (the added output for one module's input).

    Stochastic adapters read :attr:`stochastic` (False inside :meth:`mean_weights`) and draw their
    noise from :attr:`generator` (None: the global RNG). An adapter given ``head_ids`` (the K answer
    tokens it is fitted on) also updates the answer head: it defines :meth:`head_update`, and
    :meth:`answer_logits` adds it."""

    def __init__(self, modules: Mapping[str, nn.Module], head_ids: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("head_ids", None if head_ids is None else head_ids.detach().clone().cpu())
        self.modules_by_key = {key.replace(".", "__"): m for key, m in modules.items()}
        self._handles: list[Any] = []
        self.stochastic = True
        self.generator: torch.Generator | None = None

    @contextlib.contextmanager
    def mean_weights(self) -> Iterator[None]:
        """Inside the block the adapter uses its mean weights (no noise)."""
        previous, self.stochastic = self.stochastic, False
        try:
            yield
        finally:
            self.stochastic = previous

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_shapes(self, hidden: int | None) -> dict[str, tuple[int, int, torch.device]]:
        """(d_out, d_in, device) per hooked module and, with ``head_ids``, (K, hidden) for :data:`HEAD_KEY`."""
        shapes = {key: (m.out_features, m.in_features, m.weight.device) for key, m in self.modules_by_key.items()}
        if self.head_ids is not None:
            shapes[HEAD_KEY] = (len(self.head_ids), hidden, next(iter(self.modules_by_key.values())).weight.device)
        return shapes

    def head_update(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K_fit) update of the answer head's rows for ``head_ids`` (adapters that have one)."""
        raise NotImplementedError

    def answer_logits(self, backbone: Backbone, batch: dict[str, Any]) -> torch.Tensor:
        """(B, K) answer logits: the backbone's head plus :meth:`head_update` when the adapter has one (a set's
        answers outside ``head_ids`` get no update, as in a LoRA on the LM head); absent options masked."""
        features = backbone.features(batch)
        logits = backbone.head_logits(features, batch, masked=False)
        if self.head_ids is not None:
            update = self.head_update(features)
            logits = logits + align_answer_columns(update, self.head_ids, batch["answer_ids"], update.new_zeros(()))
        return mask_choices(logits, batch["choice_mask"].to(logits.device))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, :meth:`update` is added to each target module's output."""
        if self._handles:  # already active (nested use)
            yield
            return
        self._handles = [m.register_forward_hook(self._hook(key)) for key, m in self.modules_by_key.items()]
        try:
            yield
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def layer_indices(self) -> list[int]:
        return sorted({int(LAYER_INDEX.search(key.replace("__", ".")).group(1)) for key in self.modules_by_key})

    def _hook(self, key: str) -> Any:
        def add_update(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return output + self.update(key, inputs[0]).to(output.dtype)

        return add_update


class LoraHookAdapter(HookedAdapter):
    """Plain LoRA as a hooked adapter: update(x) = (alpha/r) B A x, A (r x d_in) as peft initialises it
    (Kaiming uniform), B (d_out x r) at zero. For methods that train it next to a head of their own."""

    def __init__(self, modules: Mapping[str, nn.Module], r: int, alpha: float, seed: int = 0):
        super().__init__(modules)
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for key, module in self.modules_by_key.items():
            device = next(module.parameters()).device
            bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform(a=sqrt 5), as peft's LoRA A
            a = (torch.rand(r, module.in_features, generator=generator) * 2 - 1) * bound
            self.A[key] = nn.Parameter(a.to(device))
            self.B[key] = nn.Parameter(torch.zeros(module.out_features, r, device=device))

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        a = self.A[key]
        return self.scale * (x.to(a.dtype) @ a.T) @ self.B[key].T
