"""Variational LoRA: BLoB (Flipout, closed-form KL) and Bayes-by-backprop with pyro, on a tiny model."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from baselines.bbb_lora import BbbLora
from baselines.blob import Blob, BlobAdapter
from baselines.variational_training import (
    VariationalHooks,
    gaussian_kl,
    minibatch_kl_weight,
    reference_kl_cycle,
    reference_kl_weight,
)
from bayeslora import ConfigError
from bayeslora.backbone import target_modules
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader
from bayeslora.predict import repeat_batch

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


def _train(epochs: float = 3, lr: float = 1e-2) -> TrainSettings:
    return TrainSettings(epochs=epochs, lr=lr, batch_size=8, progress=False, warmup_ratio=0.0)


def _hand_kl(mean: torch.Tensor, std: torch.Tensor, prior: float) -> float:
    """KL(N(m, s^2) || N(0, b^2)) = log(b/s) + (s^2 + m^2) / (2 b^2) - 1/2, summed."""
    return float((math.log(prior) - std.log() + (std**2 + mean**2) / (2 * prior**2) - 0.5).sum())


def test_gaussian_kl_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(3, 5, generator=g), torch.rand(3, 5, generator=g) + 0.05
    assert float(gaussian_kl(mean, std, 0.2)) == pytest.approx(_hand_kl(mean, std, 0.2), rel=1e-5)
    assert float(gaussian_kl(torch.zeros(4), torch.full((4,), 0.2), 0.2)) == pytest.approx(0.0, abs=1e-6)


def test_minibatch_kl_weights_sum_to_one_per_epoch():
    weights = [minibatch_kl_weight(i, 12) for i in range(12)]
    assert sum(weights) == pytest.approx(1.0) and weights == sorted(weights)
    assert weights[-1] == pytest.approx(2**11 / (2**12 - 1))


def test_reference_kl_cycle_and_weights_by_hand():
    assert reference_kl_cycle(600, 8, 8.0) == int(100 * 600 ** (math.pi / 8) / 8) == 154
    weights = [reference_kl_weight(g, 5) for g in range(10)]  # two cycles of C = 5: i = 1..5, 1..5
    assert weights[:5] == pytest.approx([2**i / (2**6 - 1) for i in range(1, 6)]) and weights[5:] == weights[:5]
    assert minibatch_kl_weight(2400, 2401) == pytest.approx(0.5)  # no overflow for long epochs


def _blob_hooks(tiny_backbone, batches_per_epoch, **config):
    modules = target_modules(tiny_backbone, LoraSettings(r=2, alpha=4, target_modules=["q_proj"], layers=[0]))
    cfg = Blob.make_config({"lora": LORA, **config})
    return VariationalHooks(tiny_backbone, BlobAdapter(modules, 2, 4, seed=0), cfg, 8 * batches_per_epoch,
                     batches_per_epoch)


@pytest.mark.parametrize("weighting", ["constant", "minibatch"])
@pytest.mark.parametrize("grad_accum", [1, 2, 3, 4])
def test_blob_kl_weights_sum_to_one_per_epoch_for_every_grad_accum(tiny_backbone, weighting, grad_accum):
    epochs, m = 3, 4  # 12 minibatches: 12 / grad_accum optimiser steps
    hooks = _blob_hooks(tiny_backbone, m, kl_weighting=weighting, train={"grad_accum": grad_accum, "batch_size": 8})
    steps = epochs * m // grad_accum
    assert sum(hooks.step_kl_weight(s) for s in range(steps)) == pytest.approx(epochs)
    covered = [g for s in range(steps) for g in hooks.minibatches_of_step(s)]
    assert covered == list(range(epochs * m))  # every minibatch once, in order


def test_blob_separate_kl_step_is_sgd_on_the_weighted_kl(tiny_backbone):
    hooks = _blob_hooks(tiny_backbone, 4, kl_weighting="minibatch", kl_lr=0.5,
                        train={"warmup_ratio": 0.0, "schedule": "constant"})
    hooks.on_train_begin(total_steps=10)
    (key,) = hooks.adapter.M.keys()
    m0, std0 = hooks.adapter.M[key].detach().clone(), hooks.adapter.std(key).detach().clone()
    hooks.on_step_end(step=2, epoch=0.5)  # the second step: minibatch 1 of 4, pi = 2 / 15
    # d KL / d M = M / prior^2 for KL(N(M, s^2) || N(0, prior^2))
    expected = m0 - 0.5 * (2 / 15) * m0 / 0.2**2
    torch.testing.assert_close(hooks.adapter.M[key].detach(), expected)
    assert not torch.equal(hooks.adapter.std(key).detach(), std0)  # G follows its KL gradient too


def test_blob_joint_kl_sees_every_minibatch_once_with_grad_accum(tiny_backbone, toy_splits, monkeypatch):
    seen = []
    weight = VariationalHooks.minibatch_weight
    monkeypatch.setattr(VariationalHooks, "minibatch_weight", lambda self, g: seen.append(g) or weight(self, g))
    post = Blob(Blob.make_config({"lora": LORA, "kl_optimizer": "joint", "kl_weighting": "minibatch",
                                  "train": {**vars(_train(epochs=2)), "grad_accum": 2}}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    assert seen == list(range(len(seen))) and len(seen) >= 4
    post.release()


def _blob(tiny_backbone, toy_splits, **config):
    post = Blob(Blob.make_config({"lora": LORA, "train": _train(), **config}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    return post


@pytest.mark.parametrize("flipout", ["token", "example"])
def test_blob_adapter_kl_and_flipout_noise_per_token_or_example(tiny_backbone, flipout):
    modules = target_modules(tiny_backbone, LoraSettings(r=2, alpha=4, target_modules=["q_proj"], layers=[0]))
    adapter = BlobAdapter(modules, 2, 4, seed=0, flipout=flipout)
    (key,) = adapter.M.keys()
    std = adapter.std(key)
    g = adapter.G[key].detach()
    assert float(g.min()) >= 0.05 / math.sqrt(2) and float(g.max()) <= 0.05
    by_hand = _hand_kl(adapter.M[key].detach(), std.detach(), 0.2)
    assert float(adapter.kl(0.2).detach()) == pytest.approx(by_hand, rel=1e-5)
    with torch.no_grad():
        adapter.B[key].normal_()
    x = torch.randn(1, 1, adapter.M[key].shape[1]).expand(6, 3, -1)  # one token vector, 6 examples x 3 positions
    with torch.no_grad():
        noisy = adapter.update(key, x)
        with adapter.mean_weights():
            mean = adapter.update(key, x)
    assert torch.allclose(mean[0], mean[5])  # no noise: identical rows
    rows = noisy.reshape(6, -1)
    assert all(not torch.allclose(rows[i], rows[j]) for i in range(6) for j in range(i + 1, 6))
    same_example_positions = torch.allclose(noisy[0, 0], noisy[0, 1]) and torch.allclose(noisy[0, 1], noisy[0, 2])
    assert same_example_positions == (flipout == "example")  # per token: each position its own signs
    with torch.no_grad():
        adapter.G[key].zero_()
        assert torch.allclose(adapter.update(key, x), mean)  # std 0: the mean weights


def test_blob_flipout_gives_each_example_its_own_sample(tiny_backbone, toy_splits):
    post = _blob(tiny_backbone, toy_splits)
    one = next(iter(make_loader(toy_splits[2], 1)))
    batch = repeat_batch(one, 4)  # the same example four times in one batch
    with tiny_backbone.adapters_disabled(), post.adapter.active():
        logits = tiny_backbone.class_logits(batch)
        with post.adapter.mean_weights():
            mean = tiny_backbone.class_logits(batch)
    assert torch.allclose(mean[0], mean[3])
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[2], logits[3])


def test_blob_with_zero_std_predicts_the_mean_adapter_and_reloads_exactly(tiny_backbone, toy_splits):
    post = _blob(tiny_backbone, toy_splits)
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 4)
    assert pred.logits.shape == (12, 4, 2) and pred.cost.forward_passes == 4
    assert pred.logits.std(dim=1).mean() > 0
    state = post.state_dict()
    again = Blob(post.config, seed=0)
    again.attach(tiny_backbone)
    again.load_state_dict(state)
    assert torch.equal(again.predict(loader, 4).logits, pred.logits)
    with torch.no_grad():
        for g in post.adapter.G.values():
            g.zero_()
    zero_std = post.predict(loader, 3)
    mean = post.predict(loader, 0)
    assert mean.logits.shape == (12, 1, 2)
    torch.testing.assert_close(zero_std.logits, mean.logits.expand(-1, 3, -1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", [Blob, BbbLora])
def test_elbo_loss_decreases_over_training(cls, tiny_backbone, toy_splits):
    post = cls(cls.make_config({"lora": LORA, "train": _train(epochs=4, lr=2e-2)}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    losses = [h["train_loss"] for h in post.train_result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    post.release()


def _bbb(tiny_backbone, toy_splits, **config):
    post = BbbLora(BbbLora.make_config({"lora": LORA, "train": _train(), **config}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    return post


def test_bbb_kl_is_pyros_closed_form_and_the_prior_only_touches_lora(tiny_backbone, toy_splits):
    post = _bbb(tiny_backbone, toy_splits, prior_std=0.3)
    assert not pyro.get_param_store().keys()  # the guide's parameters are its own, not pyro's global store
    means, stds = post.guide.means(), post.guide.stds()
    assert any(float((stds[s] - 1e-3).abs().max()) > 1e-5 for s in stds)  # the scales were trained
    kl = TraceMeanField_ELBO().differentiable_loss(post.model, post.guide)  # no data: -ELBO = KL(q || p)
    again = TraceMeanField_ELBO().differentiable_loss(post.model, post.guide)
    assert float(kl.detach()) == float(again.detach())  # closed form: no Monte Carlo noise
    by_hand = sum(_hand_kl(means[site], stds[site], 0.3) for site in post.model.shapes)
    assert float(kl.detach()) == pytest.approx(by_hand, rel=1e-4)
    assert set(post.model.shapes) == set(tiny_backbone.lora_parameters(post.adapter_name))
    post.release()


def test_bbb_samples_differ_collapse_to_the_mean_and_reload_exactly(tiny_backbone, toy_splits):
    post = _bbb(tiny_backbone, toy_splits, init_scale=0.05)
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 4)
    assert pred.logits.shape == (12, 4, 2) and pred.logits.std(dim=1).mean() > 1e-4
    state = post.state_dict()
    again = BbbLora(post.config, seed=0)
    again.attach(tiny_backbone)
    again.load_state_dict(state)
    assert torch.equal(again.predict(loader, 4).logits, pred.logits)
    with torch.no_grad():  # std forced to (numerically) 0: every sample is the mean adapter
        for log_scale in post.guide.log_scales:
            log_scale.fill_(-40.0)
    collapsed, mean = post.predict(loader, 3), post.predict(loader, 0)
    torch.testing.assert_close(collapsed.logits, mean.logits.expand(-1, 3, -1), atol=1e-5, rtol=1e-5)
    post.release()


def test_bad_variational_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="kl_weighting"):
        Blob(Blob.make_config({"kl_weighting": "annealed"}))
    with pytest.raises(ConfigError, match="init"):
        BbbLora(BbbLora.make_config({"init": "zeros"}))


def test_blob_on_the_answer_head_adds_b_k_m_h_and_its_kl(tiny_backbone, toy_splits):
    lora = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "lm_head"])
    post = Blob(Blob.make_config({"lora": lora, "train": _train(epochs=1)}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    adapter = post.adapter
    assert adapter.M["answer_head"].shape == (2, tiny_backbone.hidden_size)  # r x H
    assert adapter.B["answer_head"].shape == (2, 2)  # K x r
    assert float(adapter.B["answer_head"].abs().sum()) > 0  # trained
    by_hand = sum(_hand_kl(adapter.M[k].detach(), adapter.std(k).detach(), 0.2) for k in adapter.M)
    assert float(adapter.kl(0.2)) == pytest.approx(by_hand, rel=1e-5)  # the head's Gaussian is in the KL
    batch = next(iter(make_loader(toy_splits[2], 4)))
    with torch.no_grad(), tiny_backbone.adapters_disabled(), adapter.active(), adapter.mean_weights():
        h = tiny_backbone.features(batch)
        expected = tiny_backbone.head_logits(h, batch) + (4 / 2) * (h @ adapter.M["answer_head"].T) @ adapter.B[
            "answer_head"].T
        torch.testing.assert_close(post.logits(batch), expected, atol=1e-5, rtol=0)
    pred = post.predict(make_loader(toy_splits[2], 4), 3)
    again = Blob(post.config, seed=0).attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    torch.testing.assert_close(again.predict(make_loader(toy_splits[2], 4), 3).logits, pred.logits)
