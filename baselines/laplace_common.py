"""What Laplace-LoRA and last-layer Laplace share: the bridge to laplace-torch, prior tuning,
GLM logit samples, the memory estimate of a Hessian structure, and the fit/predict flow.

laplace-torch expects a model that maps a dict batch (``dict_key_x`` / ``dict_key_y``) to (B, K)
logits and whose ``requires_grad`` parameters are the ones the posterior covers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bayeslora import ConfigError, FitReport, Posterior, Predictive, ResourceNeeds
from bayeslora.adapters import MapAdapter, map_fit_report
from bayeslora.attention import differentiable_attention
from bayeslora.backbone import Backbone, lora_parameter_count
from bayeslora.config import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    Validated,
    check_choice,
)
from bayeslora.data import EncodedSplit
from bayeslora.predict import collect_predictive
from bayeslora.predictive import MASKED_LOGIT

log = logging.getLogger(__name__)

STRUCTURES = ("kron", "diag", "full")
PRIOR_METHODS = ("marglik", "gridsearch", "none")


@dataclass
class LaplaceSettings(Validated):
    """``hessian_structure``: kron (K-FAC GGN), diag or full. Prior precision lambda (scalar):
    ``prior_method`` marglik (Adam on log lambda maximising the log marginal likelihood, ``prior_steps``
    steps at ``prior_lr``), gridsearch (validation NLL of the GLM probit predictive over ``grid``),
    or none (keep ``prior_precision``). ``memory_fraction``: share of free memory the posterior may use.
    ``fit_batch_size``: batch size of the curvature pass. The default 1 keeps padding out of the K-FAC
    input factors, which sum over every sequence position a LoRA layer sees.
    ``jacobian_batch_size``: examples per GLM predictive call. laplace-torch differentiates a batch's
    whole (B, K) output, B·K backward passes each through all B examples, so a call costs O(B²·K)
    and its memory grows as B²; 1 does the least work (K backward passes per example).
    ``antithetic``: draw the S GLM logit samples in pairs f_mu ± L eps (L L^T = J Sigma J^T): every
    sample is still N(f_mu, J Sigma J^T), but each pair averages to the MAP logits, so the Monte-Carlo
    noise of S = 10 samples does not flip predictions near the decision boundary (for K = 2 the pair
    mean ranks the classes as MAP does, up to float ties); False draws S independent samples.
    The mirror images need f_mu, which costs one extra forward of the LogitsModel per chunk."""

    hessian_structure: str = "kron"
    """GGN structure: kron (K-FAC), diag or full."""
    prior_precision: PositiveFloat = 1.0
    """Scalar prior precision lambda (the start for marglik; kept with none)."""
    prior_method: str = "marglik"
    """How lambda is chosen: marglik, gridsearch (validation NLL) or none."""
    prior_steps: NonNegativeInt = 100
    """Adam steps on log lambda (marglik)."""
    prior_lr: PositiveFloat = 0.1
    """Adam's learning rate on log lambda (marglik)."""
    grid: list[PositiveFloat] = field(default_factory=lambda: [10.0 ** e for e in range(-4, 5)])
    """Values of lambda tried by gridsearch."""
    memory_fraction: Annotated[float, Range(gt=0, le=1)] = 0.9
    """Share of free memory the Hessian factors may take."""
    fit_batch_size: PositiveInt = 1
    """Batch size of the curvature pass (1 keeps padding out of K-FAC)."""
    jacobian_batch_size: PositiveInt = 1
    """Examples per GLM Jacobian call (cost grows as its square)."""
    antithetic: bool = True
    """Draw the S GLM samples in pairs f_mu +- L eps."""
    centre_rounds: PositiveInt = 3
    """Methods that fit their centre (last-layer Laplace): rounds of centre -> curvature -> prior tuning."""

    def check(self) -> None:
        check_choice("hessian_structure", self.hessian_structure, STRUCTURES)
        check_choice("prior_method", self.prior_method, PRIOR_METHODS)
        if self.jacobian_batch_size < 1:
            raise ConfigError(f"jacobian_batch_size must be a positive integer, got {self.jacobian_batch_size}")


class LogitsModel(nn.Module):
    """(B, K) answer logits of a dict batch for laplace-torch.

    Options an example lacks get z + MASKED_LOGIT rather than a constant: their probability is still 0
    (so they add nothing to the GGN), but their GLM variance stays positive, so the K x K predictive
    covariance keeps a Cholesky factor.
    """

    def __init__(self, modules: nn.Module, logits: Callable[[dict[str, Any]], torch.Tensor]):
        super().__init__()
        self.inner = modules  # registered, so laplace-torch sees the parameters that require grad
        self._logits = logits

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = self._logits(batch)
        if "choice_mask" in batch:
            mask = batch["choice_mask"].to(logits.device)
            logits = torch.where(mask, logits, logits + MASKED_LOGIT)
        return logits


def structure_bytes(weight_shapes: Iterable[tuple[int, ...]], structure: str, bytes_per_value: int = 4) -> int:
    """Bytes of the curvature and posterior factors for the given weight shapes.

    kron: per (out, in) weight, factors out^2 + in^2, kept twice (precision factors and their
    eigendecomposition); diag: 2P; full: 2P^2 (precision and its Cholesky/inverse); P = parameters.
    """
    check_choice("hessian_structure", structure, STRUCTURES)
    shapes = [tuple(s) for s in weight_shapes]
    n_params = sum(int(torch.Size(s).numel()) for s in shapes)
    if structure == "kron":
        values = sum(2 * (s[0] ** 2 + (int(torch.Size(s[1:]).numel()) if len(s) > 1 else 0) ** 2) for s in shapes)
    elif structure == "diag":
        values = 2 * n_params
    else:  # full
        values = 2 * n_params**2
    return values * bytes_per_value


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(params: Iterable[nn.Parameter], settings: LaplaceSettings, device: torch.device) -> int:
    """Log the estimate; a ConfigError (not an out-of-memory crash) when it does not fit."""
    params = list(params)
    needed = structure_bytes([p.shape for p in params], settings.hessian_structure)
    free = free_memory_bytes(device)
    log.info("Laplace %s over %d parameters: factors need %.3f GB (%.1f GB free on %s)", settings.hessian_structure,
             sum(p.numel() for p in params), needed / 1e9, free / 1e9, device)
    if needed > settings.memory_fraction * free:
        cheaper = [s for s in STRUCTURES if structure_bytes([p.shape for p in params], s) < needed]
        raise ConfigError(f"Laplace hessian_structure={settings.hessian_structure!r} needs {needed / 1e9:.1f} GB but "
                          f"only {free / 1e9:.1f} GB is free on {device}; use one of {cheaper} or fewer LoRA layers")
    return needed


def build_laplace(model: nn.Module, settings: LaplaceSettings, dict_key_x: str = "input_ids",
                  prior_precision: float | None = None) -> Any:
    """laplace-torch over the parameters of ``model`` that require grad (dict batches, CE likelihood), with
    prior precision ``prior_precision`` (default ``settings.prior_precision``)."""
    from laplace import Laplace

    prior = settings.prior_precision if prior_precision is None else prior_precision
    return Laplace(model, "classification", subset_of_weights="all", hessian_structure=settings.hessian_structure,
                   prior_precision=prior, dict_key_x=dict_key_x, dict_key_y="labels")


def tune_prior(la: Any, settings: LaplaceSettings, val_loader: Any | None) -> dict[str, float]:
    """Tune the scalar prior precision (marglik starts from ``la``'s); returns the log marginal likelihood
    before and after."""
    before = float(la.log_marginal_likelihood())
    if settings.prior_method == "marglik":
        la.optimize_prior_precision(method="marglik", pred_type="glm", n_steps=settings.prior_steps,
                                    lr=settings.prior_lr, init_prior_prec=float(la.prior_precision.mean()))
    elif settings.prior_method == "gridsearch":
        if val_loader is None:
            raise ConfigError("prior_method: gridsearch needs a validation split (data.max_val > 0)")
        la.optimize_prior_precision(method="gridsearch", pred_type="glm", link_approx="probit",
                                    val_loader=val_loader, prior_structure="scalar",
                                    log_prior_prec_min=min(torch.tensor(settings.grid).log10()).item(),
                                    log_prior_prec_max=max(torch.tensor(settings.grid).log10()).item(),
                                    grid_size=len(settings.grid), progress_bar=False)
    return {"log_marglik_init": before, "log_marglik": float(la.log_marginal_likelihood()),
            "prior_precision": float(la.prior_precision.mean())}


def glm_logit_samples(la: Any, batch: dict[str, Any], num_samples: int, generator: torch.Generator | None = None,
                      jacobian_batch_size: int | None = None, antithetic: bool = False) -> torch.Tensor:
    """(B, S, K) samples f_s ~ N(f(x; theta_MAP), J Sigma J^T) from laplace-torch's GLM predictive,
    over rows of at most ``jacobian_batch_size`` examples at a time (None: the whole batch at once).

    antithetic: laplace-torch draws ceil(S/2) samples f_mu + L eps and the rest are their mirror
    images 2 f_mu - f_s = f_mu - L eps, f_mu = f(x; theta_MAP) (the model's own forward)."""
    drawn = (num_samples + 1) // 2 if antithetic else num_samples
    chunks = []
    for rows in split_rows(batch, jacobian_batch_size):
        samples = la.functional_samples(rows, pred_type="glm", n_samples=drawn, generator=generator)
        if antithetic:
            with torch.no_grad():
                f_mu = la.model(rows).to(samples.dtype)
            samples = torch.cat([samples, 2 * f_mu - samples[: num_samples - drawn]])
        chunks.append(samples)
    return torch.cat(chunks, dim=1).permute(1, 0, 2).float()


class PreparedBatches:
    """The batches of ``loader`` cut into pieces of ``rows`` examples (:func:`split_rows`) and passed
    through ``prepare``: what laplace-torch's validation grid search iterates over, so that it sees
    the same inputs, in the same Jacobian chunks, as the GLM predictive."""

    def __init__(self, loader: Iterable[dict[str, Any]], prepare: Callable[[dict[str, Any]], dict[str, Any]],
                 rows: int | None):
        self.loader, self.prepare, self.rows = loader, prepare, rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            for piece in split_rows(batch, self.rows):
                yield self.prepare(piece)


def split_rows(batch: dict[str, Any], size: int | None) -> list[dict[str, Any]]:
    """The batch cut into consecutive pieces of ``size`` examples: every tensor or list whose length
    is the batch size is sliced, anything else (scalars, shared tensors) is kept whole."""
    n = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))
    if size is None or size >= n:
        return [batch]
    return [{k: v[i:i + size] if isinstance(v, (torch.Tensor, list)) and len(v) == n else v
             for k, v in batch.items()} for i in range(0, n, size)]


class LaplacePosterior(Posterior):
    """The one fit -> tune -> predict flow of both Laplace methods, on the (cached) MAP adapter.

    fit: MAP adapter -> memory check of ``laplace_model``'s trainable parameters -> laplace-torch
    curvature over ``curvature_loader`` -> prior precision tuned on ``validation_loader``.
    predict: S GLM logit samples per example of ``glm_inputs(batch)``. Subclasses say what the
    posterior covers by implementing those four hooks.
    """

    deterministic = False
    dict_key_x: str = "input_ids"

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """The MAP adapter, the curvature factors of :func:`structure_bytes` over :meth:`laplace_shapes`,
        and one linearised pass per example (the S samples are drawn in logit space)."""
        lora = lora_parameter_count(backbone, config.lora, num_classes)
        factors = structure_bytes(cls.laplace_shapes(backbone, config, num_classes), config.hessian_structure) // 4
        return ResourceNeeds(trainable=lora, stored=factors, predict_passes=1)

    @classmethod
    def laplace_shapes(cls, backbone: Backbone, config: Any, num_classes: int) -> list[tuple[int, ...]]:
        """Shapes of the weights the Laplace approximation is over."""
        raise NotImplementedError

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.map = MapAdapter(self)
        self.la: Any = None

    # ------------------------------------------------------------------ hooks
    def laplace_model(self, train: EncodedSplit | None) -> nn.Module:
        """The dict-batch -> (B, K) logits model whose requires_grad parameters the posterior covers."""
        raise NotImplementedError

    def curvature_loader(self, train: EncodedSplit) -> DataLoader:
        raise NotImplementedError

    def validation_loader(self, val: EncodedSplit) -> Iterable[dict[str, Any]]:
        raise NotImplementedError

    def glm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def set_samples(self, batch: dict[str, Any], inputs: dict[str, Any], samples: torch.Tensor) -> torch.Tensor:
        """The (B, S, K) samples of ``glm_inputs(batch)`` as the batch's answers (unchanged by default)."""
        return samples

    def curvature_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def fit_centre(self, train: EncodedSplit, prior_precision: float) -> dict[str, float] | None:
        """Move the posterior's parameters to the MAP of the regularised training loss under
        ``prior_precision`` before the curvature pass; None where the trained adapter is the centre
        (Laplace-LoRA). Methods that fit their centre are refitted after each prior tuning (``centre_rounds``)."""
        return None

    # ------------------------------------------------------------------ the flow
    def fit(self, backbone: Backbone, train: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        """MAP adapter; then up to ``centre_rounds`` rounds of centre (where the method fits one) ->
        curvature -> prior tuning, until the tuned prior precision moves by less than 1%."""
        report = map_fit_report(self.map.fit(backbone, train, val))
        self.map.use()  # only this adapter's LoRA parameters require grad
        model = self.laplace_model(train)
        params = [p for p in model.parameters() if p.requires_grad]
        factor_bytes = check_memory(params, self.config, backbone.device)
        prior, centre, rounds = self.config.prior_precision, None, 0
        while True:
            rounds += 1
            centre = self.fit_centre(train, prior)
            self.la = build_laplace(model, self.config, self.dict_key_x, prior_precision=prior)
            # laplace-torch's curvlinops backend builds some operands (an identity for the full GGN) with
            # factory defaults: make the backbone's device the default so they do not land on the CPU
            with self.curvature_context(), differentiable_attention(), torch.device(backbone.device):
                self.la.fit(self.curvature_loader(train))
                tuned = tune_prior(self.la, self.config, self.validation_loader(val) if val is not None else None)
            moved = abs(math.log(tuned["prior_precision"] / prior))
            prior = tuned["prior_precision"]
            if centre is None or moved < 0.01 or rounds >= self.config.centre_rounds:
                break
        report.posterior_params = sum(p.numel() for p in params)
        report.extra.update({**tuned, **(centre or {}), "factor_bytes": factor_bytes,
                             "hessian_structure": self.config.hessian_structure,
                             **({"centre_rounds": rounds} if centre is not None else {})})
        return report

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        backbone = self.map.use()
        generator = torch.Generator(backbone.device).manual_seed(self.seed)
        def sample(batch: dict[str, Any]) -> torch.Tensor:
            inputs = self.glm_inputs(batch)
            samples = glm_logit_samples(self.la, inputs, num_samples, generator, self.config.jacobian_batch_size,
                                        self.config.antithetic)
            return self.set_samples(batch, inputs, samples)

        with differentiable_attention():  # the GLM predictive differentiates the backbone
            return collect_predictive(backbone, loader, sample, desc=self.name, inference_mode=False)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.map.state(), "laplace": self.la.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.map.restore(state["adapter"])
        self.map.use()
        self.la = build_laplace(self.laplace_model(None), self.config, self.dict_key_x)
        self.la.load_state_dict(state["laplace"])
