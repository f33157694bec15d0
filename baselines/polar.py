"""PoLAR: a polar-decomposed low-rank adapter, dW = (alpha/r) X Theta Y^T, with the landing field.

Per adapted linear layer W0 (d_out x d_in): X (d_out x r) and Y (d_in x r) with orthonormal columns
at init (QR of a Gaussian), Theta (r x r) = 0 at init, so the adapted model starts equal to the base.
The update is added to the layer's output by a forward hook (PyTorch's module-hook API), so the
base model and any peft adapters on it stay untouched:  y = W0 x + (alpha/r) X Theta Y^T x.

X and Y are kept near the Stiefel manifold without retractions by the landing field: before an
ordinary optimiser step, the gradient G of P in {X, Y} is replaced by
    Lambda(P) = (G P^T - P G^T) P + lambda P (P^T P - I),
whose first term moves along the manifold and second pulls back towards P^T P = I.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bayeslora import ConfigError
from bayeslora.backbone import Backbone
from bayeslora.config import LoraSettings

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def target_modules(backbone: Backbone, lora: LoraSettings) -> dict[str, nn.Module]:
    """The modules ``lora`` names (``target_modules`` in ``lora.layers``), keyed "layers.<i>.<path>"."""
    layers = backbone.adapted_layers(lora)
    found: dict[str, nn.Module] = {}
    for name, module in backbone.lm.named_modules():
        match = _LAYER_INDEX.search(name)
        if match is None or name.rsplit(".", 1)[-1] not in lora.target_modules:
            continue
        if layers is not None and int(match.group(1)) not in layers:
            continue
        found[name[match.start():].lstrip(".")] = module
    if not found:
        raise ConfigError(f"no modules named {lora.target_modules} in layers {layers} of {backbone.model_id}")
    return found


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns (QR of a standard Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def landing_field(param: torch.Tensor, grad: torch.Tensor, strength: float) -> torch.Tensor:
    """(G P^T - P G^T) P + lambda P (P^T P - I), computed in O(d r^2) as G (P^T P) - P (G^T P) + ..."""
    gram = param.T @ param
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return grad @ gram - param @ (grad.T @ param) + strength * param @ (gram - eye)


def orthogonality_error(param: torch.Tensor) -> float:
    """||P^T P - I||_F."""
    gram = param.detach().T @ param.detach()
    return float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)))


class PolarAdapter(nn.Module):
    """X, Theta, Y for every target module; the update applies inside :meth:`active`."""

    def __init__(self, modules: dict[str, nn.Module], r: int, alpha: float, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.modules_by_key = {key.replace(".", "__"): m for key, m in modules.items()}
        self.X, self.Y, self.Theta = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for key, module in self.modules_by_key.items():
            d_out, d_in = int(module.out_features), int(module.in_features)
            if r > min(d_out, d_in):
                raise ConfigError(f"PoLAR rank r={r} exceeds the dimensions ({d_out} x {d_in}) of {key}")
            device = _module_device(module)
            self.X[key] = nn.Parameter(orthonormal(d_out, r, generator).to(device))
            self.Y[key] = nn.Parameter(orthonormal(d_in, r, generator).to(device))
            self.Theta[key] = nn.Parameter(torch.zeros(r, r, device=device))
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block, (alpha/r) X Theta Y^T x is added to each target module's output."""
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
        return sorted({int(_LAYER_INDEX.search(key.replace("__", ".")).group(1)) for key in self.modules_by_key})

    def _hook(self, key: str) -> Any:
        def add_update(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0].to(self.Y[key].dtype)
            update = ((x @ self.Y[key]) @ self.Theta[key].T) @ self.X[key].T
            return output + (self.scale * update).to(output.dtype)

        return add_update

    def stiefel_parameters(self) -> list[nn.Parameter]:
        return [*self.X.values(), *self.Y.values()]

    def apply_landing(self, strength: float = 1.0) -> None:
        """Replace the gradient of every X and Y by its landing field (call after backward)."""
        with torch.no_grad():
            for p in self.stiefel_parameters():
                if p.grad is not None:
                    p.grad.copy_(landing_field(p, p.grad, strength))

    def orthogonality_error(self) -> float:
        """max over X, Y of ||P^T P - I||_F."""
        return max(orthogonality_error(p) for p in self.stiefel_parameters())


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
