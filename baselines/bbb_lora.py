"""Bayes-by-backprop LoRA with pyro-ppl (docs/methods.md).

Mean-field Gaussian q(theta) over every LoRA parameter (A and B of a peft adapter), prior
p(theta) = N(0, ``prior_std``^2), trained on the ELBO

    ELBO = sum_n E_q[log p(y_n | x_n, theta)] - KL(q || p).

The pyro model has one ``sample`` site per LoRA factor (named by its parameter path) and runs the
network with the sampled factors through ``Backbone.class_logits_with`` (torch.func.functional_call):
the frozen backbone never enters pyro. The guide, :class:`MeanFieldGuide`, samples each site from
``Normal(loc, exp(log_scale)).to_event()`` with loc initialised at the adapter's starting values
(``init: lora`` = peft's init, ``init: map`` = the shared MAP adapter) and scale ``init_scale``; its
parameters are ordinary module parameters, not entries of pyro's global parameter store, so several
posteriors can live in one process. (pyro's ``AutoNormal`` samples in an unconstrained space behind
a Delta site, for which the ELBO falls back to a one-sample KL estimate; this guide keeps the KL
exact.) The loss is pyro's ``TraceMeanField_ELBO`` (closed-form Normal KL) divided by N, i.e.
mean CE + KL/N on each minibatch (the data plate is subsampled), minimised by the shared training
loop's AdamW over the guide's parameters. Prediction: S weight draws from the guide (seeded, the
same draws for every example), or ``num_samples = 0``: the guide's means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.utils.data import DataLoader

from bayeslora import ConfigError, FitReport, Posterior, Predictive, ResourceNeeds
from bayeslora.adapters import ClassifierHooks, fit_lora_adapter
from bayeslora.backbone import Backbone, answer_rows, lora_parameter_count
from bayeslora.config import AdapterConfig, check_choice
from bayeslora.data import EncodedSplit
from bayeslora.predict import predict_with_weights
from bayeslora.training import TrainResult, final_train_loss, train_seeded

INITS = ("lora", "map")


@dataclass
class BbbConfig(AdapterConfig):
    """``prior_std``: beta; ``init``: lora | map (where the guide's means start); ``init_scale``:
    the guide's initial std; ``elbo_particles``: Monte Carlo samples of the likelihood term per step."""

    prior_std: float = 0.2
    """beta, the std of the Gaussian prior on A and B."""
    init: str = "lora"
    """Where the guide's means start: lora (peft's init) or map."""
    init_scale: float = 1e-3
    """The guide's initial std."""
    elbo_particles: int = 1
    """Monte Carlo samples of the likelihood term per step."""

    def check(self) -> None:
        check_choice("bbb_lora init", self.init, INITS)
        if self.prior_std <= 0 or self.init_scale <= 0 or self.elbo_particles < 1:
            raise ConfigError("bbb_lora prior_std and init_scale must be positive and elbo_particles >= 1")


class LoraBayesModel:
    """The pyro model: theta ~ N(0, beta^2 I) per LoRA factor, y ~ Categorical(logits(x; theta))."""

    def __init__(self, backbone: Backbone, adapter: str, shapes: dict[str, torch.Size], prior_std: float,
                 n_data: int):
        self.backbone, self.adapter, self.shapes = backbone, adapter, shapes
        self.prior_std, self.n_data = prior_std, n_data

    def prior(self, key: str) -> dist.Distribution:
        shape = self.shapes[key]
        zeros = torch.zeros(shape, device=self.backbone.device)
        return dist.Normal(zeros, self.prior_std).to_event(len(shape))

    def __call__(self, batch: dict[str, Any] | None = None) -> torch.Tensor | None:
        """Without a batch only the weight sites run (used to set up the guide)."""
        weights = {key: pyro.sample(key, self.prior(key)) for key in self.shapes}
        if batch is None:
            return None
        logits = self.backbone.class_logits_with(self.adapter, weights, batch)
        labels = batch["labels"].to(logits.device)
        with pyro.plate("data", self.n_data, subsample_size=len(labels)):
            pyro.sample("y", dist.Categorical(logits=logits), obs=labels)
        return logits


class MeanFieldGuide(nn.Module):
    """q(theta) = prod_sites N(loc, diag(exp(log_scale))^2), one pyro ``sample`` site per LoRA factor."""

    def __init__(self, init: dict[str, torch.Tensor], init_scale: float):
        super().__init__()
        self.sites = list(init)
        self.locs = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in init.values()])
        self.log_scales = nn.ParameterList([nn.Parameter(torch.full_like(v.float(), math.log(init_scale)))
                                            for v in init.values()])

    def distribution(self, i: int) -> dist.Distribution:
        loc = self.locs[i]
        return dist.Normal(loc, self.log_scales[i].exp()).to_event(loc.dim())

    def forward(self, batch: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        return {site: pyro.sample(site, self.distribution(i)) for i, site in enumerate(self.sites)}

    def means(self) -> dict[str, torch.Tensor]:
        return {site: self.locs[i].detach() for i, site in enumerate(self.sites)}

    def stds(self) -> dict[str, torch.Tensor]:
        return {site: self.log_scales[i].detach().exp() for i, site in enumerate(self.sites)}


class BbbHooks(ClassifierHooks):
    """-ELBO / N per minibatch (pyro's TraceMeanField_ELBO) over the guide's parameters."""

    def __init__(self, backbone: Backbone, model: LoraBayesModel, guide: MeanFieldGuide, particles: int):
        super().__init__(backbone, dict(guide.named_parameters()))
        self.model, self.guide = model, guide
        self.elbo = TraceMeanField_ELBO(num_particles=particles)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.guide.parameters()), "weight_decay": 0.0}]

    def loss(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.model, self.guide, batch) / self.model.n_data

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:  # validation NLL at the guide's means
        return self.backbone.class_logits_with(self.model.adapter, self.guide.means(), batch)


class BbbLora(Posterior):
    """Mean-field Gaussian over all LoRA parameters by SVI (pyro); S forward passes."""

    name = "bbb_lora"
    supports_gradient_checkpointing = False
    Config = BbbConfig
    description = "Bayes-by-backprop LoRA: mean-field Gaussian over A and B, pyro SVI (ELBO), S forward passes"
    saves_state = True

    @classmethod
    def resource_needs(cls, backbone: Backbone, config: Any, num_classes: int) -> ResourceNeeds:
        """A mean and a scale per LoRA parameter."""
        return ResourceNeeds(trainable=2 * lora_parameter_count(backbone, config.lora, num_classes))

    def __init__(self, config: Any = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.model: LoraBayesModel | None = None
        self.guide: MeanFieldGuide | None = None
        self.train_result: TrainResult | None = None

    def _build(self, backbone: Backbone, n_data: int) -> None:
        """The adapter (its values are the guide's initial means), the model and the guide."""
        params = backbone.lora_parameters(self.adapter_name)
        shapes = {k: p.shape for k, p in params.items()}
        self.model = LoraBayesModel(backbone, self.adapter_name, shapes, self.config.prior_std, n_data)
        self.guide = MeanFieldGuide({k: p.detach() for k, p in params.items()}, self.config.init_scale)

    def fit(self, backbone: Backbone, train_split: EncodedSplit, val: EncodedSplit | None = None) -> FitReport:
        self.attach_for_training(backbone)
        settings = self.config.train
        if self.config.init == "map":
            fit_lora_adapter(backbone, self.adapter_name, self.config.lora, settings, train_split, val, self.seed,
                             self.artifacts)
        else:
            backbone.add_lora(self.adapter_name, self.config.lora, seed=self.seed,
                              answer_ids=train_split.answer_ids)
        def make_hooks(loader: DataLoader) -> BbbHooks:
            self._build(backbone, len(train_split))  # the guide's init draws follow from the seed
            return BbbHooks(backbone, self.model, self.guide, self.config.elbo_particles)

        result = self.train_result = train_seeded(make_hooks, train_split, val, settings, self.seed,
                                                  backbone.device, desc=f"train {self.name}")
        n_lora = sum(int(torch.Size(s).numel()) for s in self.model.shapes.values())
        return FitReport(trainable_params=2 * n_lora,
                         posterior_params=2 * n_lora, train_steps=result.steps,
                         extra={"best_val_nll": result.best_val_nll, "train_seconds": result.seconds,
                                "final_train_loss": final_train_loss(result)})

    def draws(self, num_samples: int) -> list[dict[str, torch.Tensor]]:
        """S weight samples from the guide (seeded; the global RNG is left as it was)."""
        with torch.no_grad():
            if num_samples == 0:
                return [self.guide.means()]
            with torch.random.fork_rng(devices=[self.model.backbone.device] if self.model.backbone.device.type
                                       == "cuda" else []):
                torch.manual_seed(self.seed)
                return [{k: v.detach() for k, v in self.guide().items()} for _ in range(num_samples)]

    def predict(self, loader: DataLoader, num_samples: int) -> Predictive:
        return predict_with_weights(self.require_backbone(), self.adapter_name, self.draws(num_samples), loader,
                                    self.name)

    def state_dict(self) -> dict[str, Any]:
        return {"guide": {k: v.detach().cpu() for k, v in self.guide.state_dict().items()},
                "n_data": self.model.n_data,
                "answer_rows": answer_rows(self.require_backbone().adapter_state(self.adapter_name))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        backbone = self.require_backbone()
        backbone.ensure_adapter(self.adapter_name, self.config.lora, num_classes=state.get("answer_rows"))
        self._build(backbone, state["n_data"])
        self.guide.load_state_dict(state["guide"])
