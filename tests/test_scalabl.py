"""ScalaBL against hand computations: the closed-form KL (both directions), the SVD initialisation, the
adapter diag(s) V_h at zero noise, the KL step on the singular values, and on the tiny model training,
sampling, a zero-std posterior that predicts its mean, and save/reload."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.scalabl import Scalabl, ScalablAdapter, singular_value_init
from baselines.variational_training import VariationalHooks
from bayeslora import ConfigError, get_method
from bayeslora.backbone import target_modules
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


def _adapter(tiny_backbone, **kwargs) -> tuple[ScalablAdapter, str]:
    modules = target_modules(tiny_backbone, LoraSettings(r=2, alpha=4, target_modules=["q_proj"], layers=[0]))
    adapter = ScalablAdapter(modules, 2, 4, seed=0, **kwargs)
    (key,) = adapter.log_mu.keys()
    return adapter, key


def test_the_initial_a_is_diag_s_vh_of_a_peft_initialised_a():
    s, vh = singular_value_init(3, 10, torch.Generator().manual_seed(0))
    torch.testing.assert_close(vh @ vh.T, torch.eye(3), atol=1e-6, rtol=0)  # orthonormal rows
    torch.testing.assert_close(torch.linalg.svdvals(s[:, None] * vh), s, atol=1e-6, rtol=0)
    a0 = (torch.rand(3, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1) / math.sqrt(10)
    torch.testing.assert_close(s, torch.linalg.svdvals(a0).float(), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="lora.r"):
        singular_value_init(11, 10, torch.Generator())


@pytest.mark.parametrize("direction", ["elbo", "reference"])
def test_kl_is_the_closed_form(tiny_backbone, direction):
    adapter, key = _adapter(tiny_backbone, kl_direction=direction)
    with torch.no_grad():
        adapter.log_mu[key].copy_(torch.tensor([0.3, -1.0]))
        adapter.log_sigma[key].copy_(torch.tensor([-2.0, -0.5]))
    mu, sigma, prior = torch.tensor([0.3, -1.0]).exp(), torch.tensor([-2.0, -0.5]).exp(), 0.7
    if direction == "elbo":  # KL(N(mu, sigma^2) || N(0, b^2)) = log(b/sigma) + (sigma^2 + mu^2)/(2 b^2) - 1/2
        by_hand = (math.log(prior) - sigma.log() + (sigma**2 + mu**2) / (2 * prior**2) - 0.5).sum()
    else:  # KL(N(0, b^2) || N(mu, sigma^2)) = log(sigma/b) + (b^2 + mu^2)/(2 sigma^2) - 1/2
        by_hand = (sigma.log() - math.log(prior) + (prior**2 + mu**2) / (2 * sigma**2) - 0.5).sum()
    assert float(adapter.kl(prior).detach()) == pytest.approx(float(by_hand), rel=1e-5)


def test_the_adapter_is_diag_s_vh_at_zero_noise_and_noise_enters_only_through_s(tiny_backbone):
    adapter, key = _adapter(tiny_backbone, noise="example")
    sigma = adapter.std(key).detach()
    assert float(sigma.min()) >= 0.05 / math.sqrt(2) and float(sigma.max()) <= 0.05
    with torch.no_grad():
        adapter.B[key].normal_()
    x = torch.randn(1, 1, adapter.Vh[key].shape[1]).expand(5, 3, -1)
    a = adapter.mean(key).detach()[:, None] * adapter.Vh[key].detach()
    expected = 2.0 * x @ a.T @ adapter.B[key].detach().T  # (alpha / r) B diag(s) V_h x
    with torch.no_grad():
        with adapter.mean_weights():
            torch.testing.assert_close(adapter.update(key, x), expected, atol=1e-6, rtol=1e-5)
        noisy = adapter.update(key, x)
        assert not torch.allclose(noisy[0], noisy[1])  # noise: example, one draw per example
        assert torch.allclose(noisy[0, 0], noisy[0, 2])  # ... shared by its positions
        adapter.log_sigma[key].fill_(-60.0)  # std 0: the mean adapter
        torch.testing.assert_close(adapter.update(key, x), expected, atol=1e-6, rtol=1e-5)


def test_forward_noise_is_one_draw_for_the_whole_batch(tiny_backbone):
    adapter, key = _adapter(tiny_backbone)
    with torch.no_grad():
        adapter.B[key].normal_()
        x = torch.randn(1, 1, adapter.Vh[key].shape[1]).expand(4, 2, -1)
        first, second = adapter.update(key, x), adapter.update(key, x)
    assert torch.allclose(first[0], first[3]) and not torch.allclose(first, second)


@pytest.mark.parametrize("direction", ["reference", "elbo"])
def test_the_separate_kl_step_moves_the_singular_values_by_their_kl_gradient(tiny_backbone, direction):
    adapter, key = _adapter(tiny_backbone, kl_direction=direction)
    cfg = Scalabl.make_config({"lora": LORA, "kl_weighting": "minibatch", "kl_lr": 0.5, "kl_direction": direction,
                               "train": {"warmup_ratio": 0.0, "schedule": "constant"}})
    hooks = VariationalHooks(tiny_backbone, adapter, cfg, 32, 4)
    hooks.on_train_begin(total_steps=10)
    log_mu, log_sigma = adapter.log_mu[key].detach().clone(), adapter.log_sigma[key].detach().clone()
    vh = adapter.Vh[key].detach().clone()
    hooks.on_step_end(step=2, epoch=0.5)  # minibatch 1 of 4: pi = 2 / 15
    mu, sigma, step = log_mu.exp(), log_sigma.exp(), 0.5 * 2 / 15
    if direction == "elbo":  # KL = sum -log sigma + (sigma^2 + mu^2)/2 - 1/2
        d_log_mu, d_log_sigma = mu**2, sigma**2 - 1
    else:  # KL = sum log sigma + (1 + mu^2)/(2 sigma^2) - 1/2
        d_log_mu, d_log_sigma = mu**2 / sigma**2, 1 - (1 + mu**2) / sigma**2
    torch.testing.assert_close(adapter.log_mu[key].detach(), log_mu - step * d_log_mu)
    torch.testing.assert_close(adapter.log_sigma[key].detach(), log_sigma - step * d_log_sigma)
    assert torch.equal(adapter.Vh[key].detach(), vh)  # V_h is a point estimate: no KL


def _train(epochs: float = 3) -> TrainSettings:
    return TrainSettings(epochs=epochs, lr=2e-2, batch_size=8, progress=False, warmup_ratio=0.0)


def test_scalabl_trains_samples_reloads_and_collapses_to_its_mean(tiny_backbone, toy_splits):
    post = Scalabl(Scalabl.make_config({"lora": LORA, "train": _train()}), seed=0)
    report = post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    n_modules = len(target_modules(tiny_backbone, LORA))
    assert report.posterior_params == 2 * 2 * n_modules and report.extra["posterior_dims"] == 2 * n_modules
    losses = [h["train_loss"] for h in post.train_result.history]
    assert losses[-1] < losses[0]
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 4)
    assert pred.logits.shape == (12, 4, 2) and pred.logits.std(dim=1).mean() > 0
    again = Scalabl(post.config, seed=0).attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    assert torch.equal(again.predict(loader, 4).logits, pred.logits)
    with torch.no_grad():
        for p in post.adapter.log_sigma.values():
            p.fill_(-60.0)
    torch.testing.assert_close(post.predict(loader, 3).logits, post.predict(loader, 0).logits.expand(-1, 3, -1),
                               atol=1e-6, rtol=1e-6)
    post.release()


def test_scalabl_on_the_answer_head_and_its_settings(tiny_backbone, toy_splits):
    lora = LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "lm_head"])
    post = Scalabl(Scalabl.make_config({"lora": lora, "train": _train(epochs=1)}), seed=0)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    assert post.adapter.Vh["answer_head"].shape == (2, tiny_backbone.hidden_size)
    assert post.adapter.B["answer_head"].shape == (2, 2)
    post.release()
    with pytest.raises(ConfigError, match="noise: example"):
        Scalabl.make_config({"samples_per_forward": 4})
    with pytest.raises(ConfigError, match="kl_direction"):
        Scalabl.make_config({"kl_direction": "reverse"})
    assert get_method("scalabl") is Scalabl


def test_counts_from_the_config_match_a_built_adapter_and_qwen_7b_by_hand(tiny_backbone, capsys):
    from bayeslora.meta import meta_backbone
    from benchmarks.cli import main

    lora = LoraSettings(r=2, alpha=4, target_modules=["q_proj", "lm_head"])
    counts = Scalabl.count_parameters(tiny_backbone, {"lora": lora}, num_classes=2)
    modules = target_modules(tiny_backbone, lora)
    adapter = ScalablAdapter(modules, 2, 4, head_ids=torch.arange(2), hidden=tiny_backbone.hidden_size)
    assert sum(p.numel() for p in adapter.parameters()) == counts["scalabl"]
    assert counts["posterior_dims"] == adapter.posterior_dims() == 2 * (len(modules) + 1)
    qwen = Scalabl.count_parameters(meta_backbone("Qwen/Qwen2.5-7B"),
                                    {"lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]}}, num_classes=4)
    assert qwen["posterior_dims"] == 8 * (2 * 28 + 1) and qwen["extra"] == 912  # r per module and the head
    assert main(["params", "scalabl", "--model", "Qwen/Qwen2.5-7B", "--set", "lora.target_modules=[q_proj]"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    assert int(printed["posterior_dims"].replace(",", "")) == 8 * 28
    assert main(["params", "map", "--model", "Qwen/Qwen2.5-7B"]) == 2
    assert "bayesian_lora, scalabl" in capsys.readouterr().err
