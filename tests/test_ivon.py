"""IVON-LoRA: training through the shared loop with the ivon-opt optimiser, parameter draws with the
posterior's std 1/sqrt(lambda (h + delta)), a zero-variance posterior that predicts its mean, gradient
accumulation as Monte Carlo samples, and save/reload."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.ivon_lora import IvonHooks, IvonLora, posterior_std
from bayeslora import ConfigError, get_method
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


def _ivon(tiny_backbone, toy_splits, epochs: float = 3, **config) -> IvonLora:
    train = TrainSettings(epochs=epochs, batch_size=8, progress=False, warmup_ratio=0.0)
    post = IvonLora(IvonLora.make_config({"lora": LORA, "train": train, "lr": 0.1, **config}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    return post


def test_ivon_trains_its_mean_and_hessian_and_samples_with_the_posterior_std(tiny_backbone, toy_splits):
    post = _ivon(tiny_backbone, toy_splits, ess=400.0)
    assert post.ess == 400.0
    hess = torch.cat([g["hess"] for g in post.optimizer.param_groups])
    assert not torch.allclose(hess, torch.full_like(hess, 0.05))  # the Hessian estimate was updated
    mean_state = post.draws(0)[0]
    assert all(float(v.abs().sum()) > 0 for k, v in mean_state.items() if "lora_B" in k)  # B trained away from zero
    draws = post.draws(2000)
    keys = list(draws[0])
    stacked = torch.stack([torch.cat([d[k].flatten() for k in keys]) for d in draws])
    mean = torch.cat([mean_state[k].flatten() for k in keys])
    std = posterior_std(post.optimizer).cpu()
    order = torch.cat([p.flatten() for g in post.optimizer.param_groups for p in g["params"]]).cpu()
    assert torch.equal(order, mean)  # the optimiser's flat order is the adapter's
    torch.testing.assert_close(stacked.mean(0), mean, atol=float(4 * std.max() / math.sqrt(2000)), rtol=0)
    torch.testing.assert_close(stacked.std(0) / std, torch.ones_like(std), atol=0.1, rtol=0)  # 1/sqrt(lambda(h+d))
    post.release()


def test_at_zero_variance_the_sampled_predictive_is_the_mean_and_a_reload_predicts_the_same(tiny_backbone,
                                                                                             toy_splits):
    post = _ivon(tiny_backbone, toy_splits)
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 4)
    assert pred.logits.shape == (12, 4, 2) and pred.logits.std(dim=1).mean() > 0
    again = IvonLora(post.config, seed=0).attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    assert torch.equal(again.predict(loader, 4).logits, pred.logits)
    for group in post.optimizer.param_groups:
        group["hess"] = torch.full_like(group["hess"], math.inf)  # std = 1/sqrt(lambda (inf + delta)) = 0
    mean = post.predict(loader, 0)
    assert mean.logits.shape == (12, 1, 2)
    torch.testing.assert_close(post.predict(loader, 3).logits, mean.logits.expand(-1, 3, -1), atol=0, rtol=0)
    post.release()


def test_accumulated_minibatches_are_ivon_samples_of_one_step(tiny_backbone, toy_splits):
    """With zero noise each sample's gradient is the minibatch's gradient at the mean: IVON's step must see
    their average (the loop's 1/grad_accum scaling undone)."""
    tiny_backbone.add_lora("acc", LORA, seed=0)
    params = tiny_backbone.lora_parameters("acc")
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.1)
    config = IvonLora.make_config({"lora": LORA, "train": {"grad_accum": 2}})
    hooks = IvonHooks(tiny_backbone, params, config, ess=100.0)
    optimizer = hooks.make_optimizer(hooks.param_groups(), config.train)
    for group in optimizer.param_groups:
        group["hess"] = torch.full_like(group["hess"], math.inf)
    batches = list(make_loader(toy_splits[0], 8))[:2]
    by_batch = []
    for batch in batches:
        grads = torch.autograd.grad(hooks.loss(batch, 0), list(params.values()))
        by_batch.append(torch.cat([g.flatten() for g in grads]))
    for batch in batches:  # what the loop does for one step with grad_accum = 2
        with hooks.step_context():
            (hooks.loss(batch, 0) / 2).backward()
    assert optimizer.state["count"] == 2
    torch.testing.assert_close(optimizer.state["avg_grad"], (by_batch[0] + by_batch[1]) / 2, atol=1e-6, rtol=1e-5)
    tiny_backbone.delete_adapter("acc")


def test_ivon_settings_and_defaults(tiny_backbone, toy_splits):
    assert get_method("ivon") is IvonLora
    post = IvonLora(IvonLora.make_config({}), seed=0)
    assert post.effective_sample_size(400) == pytest.approx(5000 * 20)  # BayesAdapt's 5000 sqrt(N)
    with pytest.raises(ConfigError, match="beta2"):
        IvonLora.make_config({"beta2": 1.5})
    with pytest.raises(ConfigError, match="hess_init"):
        IvonLora.make_config({"hess_init": 0.0})
