"""LoRA-XS: a low-rank update between frozen singular vectors of the pretrained weight.

Per adapted linear layer W0 (d_out x d_in), the truncated SVD W0 ~= U_r Sigma_r V_r^T gives the
frozen factors B = U_r (d_out x r) and A = Sigma_r V_r^T (r x d_in); only R (r x r, init
N(0, init_std^2) with init_std = 1e-5) trains, and

    y = W0 x + (alpha / r) B R A x.

The update is added to each target module's output by a forward hook (PyTorch's module-hook API,
as for PoLAR), inside :meth:`LoraXsAdapter.active`; the model and any peft adapters on it stay
untouched. The SVD is computed once per (model weights, modules, r), in float32 on the model's
device, and kept in the results folder's artifact cache.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bayeslora import ConfigError
from bayeslora.artifacts import ArtifactStore
from bayeslora.backbone import Backbone, target_modules
from bayeslora.config import LoraSettings
from bayeslora.trunk import update_weight_digest

from .hooked_adapter import HookedAdapter


def truncated_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r, Sigma_r V_r^T) of the rank-r truncated SVD, float32 on the weight's device."""
    if not 1 <= r <= min(weight.shape):
        raise ConfigError(f"LoRA-XS rank r={r} must be between 1 and min{tuple(weight.shape)}")
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u[:, :r].contiguous(), (s[:r, None] * vh[:r]).contiguous()


def svd_cache_key(backbone: Backbone, modules: Mapping[str, nn.Module], r: int) -> dict[str, Any]:
    """What the factors depend on: the model, r and the target weights (the trunk cache's strided
    weight digest), so the cache misses when the weights change."""
    h = hashlib.blake2b(digest_size=12)
    update_weight_digest(h, ((key, modules[key].weight) for key in sorted(modules)))
    return {"model": backbone.model_id, "r": r, "weights": h.hexdigest()}


def lora_xs_factors(backbone: Backbone, lora: LoraSettings,
                    artifacts: ArtifactStore | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) per target module (keys "layers.<i>.<path>"), from the artifact cache when present."""
    modules = target_modules(backbone, lora)
    key = svd_cache_key(backbone, modules, lora.r)
    if artifacts is not None:
        cached = artifacts.get("lora_xs_svd", key)
        if cached is not None:
            return cached
    factors = {k: tuple(t.cpu() for t in truncated_svd(m.weight, lora.r)) for k, m in modules.items()}
    if artifacts is not None:
        artifacts.save("lora_xs_svd", key, factors)
    return factors


class LoraXsAdapter(HookedAdapter):
    """Frozen B, A and trainable R for every target module; the update applies inside :meth:`active`."""

    def __init__(self, modules: Mapping[str, nn.Module], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 r: int, alpha: float, seed: int = 0, init_std: float = 1e-5):
        super().__init__(modules)
        missing = sorted(set(modules) - set(factors))
        if missing:
            raise ConfigError(f"LoRA-XS factors missing for modules {missing[:3]}")
        generator = torch.Generator().manual_seed(seed)
        self.scale = alpha / r
        self.R = nn.ParameterDict()
        for key, module in modules.items():
            safe = key.replace(".", "__")
            device = module.weight.device
            b, a = factors[key]
            if b.shape != (module.out_features, r) or a.shape != (r, module.in_features):
                raise ConfigError(f"LoRA-XS factors of {key} have shapes {tuple(b.shape)}, {tuple(a.shape)}; "
                                  f"expected ({module.out_features}, {r}), ({r}, {module.in_features})")
            self.register_buffer(f"B__{safe}", b.to(device))
            self.register_buffer(f"A__{safe}", a.to(device))
            self.R[safe] = nn.Parameter(init_std * torch.randn(r, r, generator=generator).to(device))

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"B__{key}"), getattr(self, f"A__{key}")

    def delta_weight(self, key: str) -> torch.Tensor:
        """(alpha/r) B R A for one module (key with '__' separators)."""
        b, a = self.factors(key)
        return self.scale * b @ self.R[key] @ a

    def update(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B R A x."""
        b, a = self.factors(key)
        return self.scale * ((x.to(a.dtype) @ a.T) @ self.R[key].T) @ b.T

    @contextlib.contextmanager
    def using_values(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """R set to ``values`` (keys as in ``self.R``) inside the block, restored afterwards."""
        saved = {k: p.detach().clone() for k, p in self.R.items()}
        with torch.no_grad():
            for k, v in values.items():
                self.R[k].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    self.R[k].copy_(v)
