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

import torch
from torch import nn

from bayeslora import ConfigError

from .hooked_adapter import HookedAdapter

__all__ = ["PolarAdapter", "landing_field", "orthogonality_error", "orthonormal"]

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


class PolarAdapter(HookedAdapter):
    """X, Theta, Y for every target module; the update applies inside :meth:`active`."""

    def __init__(self, modules: dict[str, nn.Module], r: int, alpha: float, seed: int = 0):
        super().__init__(modules)
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.X, self.Y, self.Theta = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for key, module in self.modules_by_key.items():
            d_out, d_in = int(module.out_features), int(module.in_features)
            if r > min(d_out, d_in):
                raise ConfigError(f"PoLAR rank r={r} exceeds the dimensions ({d_out} x {d_in}) of {key}")
            device = _module_device(module)
            self.X[key] = nn.Parameter(orthonormal(d_out, r, generator).to(device))
            self.Y[key] = nn.Parameter(orthonormal(d_in, r, generator).to(device))
            self.Theta[key] = nn.Parameter(torch.zeros(r, r, device=device))

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) X Theta Y^T x."""
        x = x.to(self.Y[key].dtype)
        return self.scale * ((x @ self.Y[key]) @ self.Theta[key].T) @ self.X[key].T

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
