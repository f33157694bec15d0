"""Bayesian-LoRA: the inducing-weight layer against dense Gaussian references, and the method end to end."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from baselines.bayesian_lora import HEAD_KEY, BayesianLora, InducingLoraAdapter, parameter_count
from baselines.inducing_weights import InducingFactor, InducingSettings, inducing_factor_parameter_count
from bayeslora import ConfigError
from bayeslora.backbone import target_modules
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader
from bayeslora.meta import meta_backbone

QWEN_7B = "Qwen/Qwen2.5-7B"  # its config ships in bayeslora/model_configs/


def _factor(d_out: int = 3, d_in: int = 4, q: str = "diagonal", seed: int = 0, **settings) -> InducingFactor:
    """A factor with every parameter moved off its initial value, in float64."""
    config = InducingSettings(rows=2, cols=2, q_inducing=q, init_d=0.3, max_q_std=10.0, **settings)
    factor = InducingFactor(d_out, d_in, config, torch.Generator().manual_seed(seed)).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in factor.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return factor


def _dense_prior(factor: InducingFactor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Cov U, Cov(U, W), Cov W) of the joint prior over row-major vec U, vec W, built directly."""
    d_row, d_col = factor.diagonals()
    k_row = factor.z_row @ factor.z_row.T + torch.diag(d_row**2)
    k_col = factor.z_col @ factor.z_col.T + torch.diag(d_col**2)
    return torch.kron(k_row, k_col), torch.kron(factor.z_row, factor.z_col), torch.eye(factor.d_out * factor.d_in,
                                                                                        dtype=k_row.dtype)


@pytest.mark.parametrize("q", ["diagonal", "full"])
def test_inducing_kl_equals_the_kl_against_the_kronecker_prior(q):
    """KL(q(u) || N(0, I)) in whitened coordinates = KL(q(U) || N(0, K_r (x) K_c)) for U = L_r u L_c^T."""
    factor = _factor(q=q)
    with torch.no_grad():
        l_row, l_col, _, _ = factor.whitening()
        lift = torch.kron(l_row, l_col)  # row-major vec(L_r u L_c^T) = (L_r (x) L_c) vec(u)
        scale = factor.q_scale_tril()
        q_u = MultivariateNormal(lift @ factor.q_mean.flatten(), scale_tril=lift @ scale)
        cov_u, _, _ = _dense_prior(factor)
        p_u = MultivariateNormal(torch.zeros(cov_u.shape[0], dtype=cov_u.dtype), covariance_matrix=cov_u)
        reference = kl_divergence(q_u, p_u)
        assert float(factor.kl_inducing()) == pytest.approx(float(reference), rel=1e-6)
    if q == "full":
        assert torch.count_nonzero(torch.tril(scale, -1)) > 0  # a genuinely correlated q(u)


def test_conditional_kl_equals_the_dense_gaussian_kl():
    factor = _factor(init_lambda=0.01, max_lambda=0.03)
    with torch.no_grad():
        cov_u, cross, cov_w = _dense_prior(factor)
        sigma = cov_w - cross.T @ torch.linalg.solve(cov_u, cross)  # Cov(W | U) by the Schur complement
        mean = torch.zeros(sigma.shape[0], dtype=sigma.dtype)
        lam = factor.lam
        reference = kl_divergence(MultivariateNormal(mean, covariance_matrix=lam**2 * sigma),
                                  MultivariateNormal(mean, covariance_matrix=sigma))
        assert float(factor.kl_conditional()) == pytest.approx(float(reference), rel=1e-6)
        assert 0 < float(lam) < 0.03


def test_conditional_mean_and_matheron_noise_match_the_dense_conditional():
    factor = _factor()
    with torch.no_grad():
        cov_u, cross, cov_w = _dense_prior(factor)
        l_row, l_col, r, c = factor.whitening()
        u = l_row @ factor.q_mean @ l_col.T  # the unwhitened mean inducing matrix
        dense_mean = cross.T @ torch.linalg.solve(cov_u, u.flatten())  # E[W | U] = Cov(W,U) Cov(U)^-1 U
        torch.testing.assert_close(factor(stochastic=False).flatten(), factor.sigma_p * dense_mean,
                                   rtol=1e-4, atol=1e-6)  # up to the Cholesky jitter
        sigma = cov_w - cross.T @ torch.linalg.solve(cov_u, cross)
        g = torch.Generator().manual_seed(3)
        draws = torch.stack([factor.matheron_noise(l_row, l_col, r, c, g).flatten() for _ in range(20000)])
    assert draws.mean(0).abs().max() < 0.03
    empirical = torch.cov(draws.T)
    assert (empirical - sigma).abs().max() < 0.04
    assert float(torch.linalg.eigvalsh(sigma).min()) < 0.9  # conditioning really shrank the covariance


def test_flow_kl_estimate_averages_to_the_closed_form_at_the_identity_flow():
    factor = _factor(q="flow")
    with torch.no_grad():
        last = factor.flow.arn.layers[-1]
        last.weight.zero_()
        last.bias.zero_()  # loc = 0, log scale = 0: the flow is the identity, q(u) the base Gaussian
        std = torch.diagonal(factor.q_scale_tril())
        closed = 0.5 * (std**2 + factor.q_mean.flatten() ** 2 - 1 - 2 * std.log()).sum()
        g = torch.Generator().manual_seed(5)
        estimates = torch.stack([factor.kl_inducing(g) for _ in range(4000)])
        torch.testing.assert_close(factor.mean_u(), factor.q_mean)
    assert float(estimates.mean()) == pytest.approx(float(closed), abs=4 * float(estimates.std()) / 4000**0.5)
    assert float(estimates.std()) > 0  # a Monte Carlo estimate, not the closed form in disguise


def test_bayesian_lora_with_a_flow_posterior_trains_and_predicts(tiny_backbone, toy_splits):
    config = _config(inducing={"q_inducing": "flow", "prior_std": 1.0})
    config.train.epochs = 1
    post = BayesianLora(config, seed=0)
    report = post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    flows = [f.flow for f in post.adapter.inducing_factors()]
    assert all(f is not None for f in flows)
    assert report.posterior_params > sum(p.numel() for f in flows for p in f.parameters())
    pred = post.predict(make_loader(toy_splits[2], 4), 2)
    assert pred.logits.shape == (12, 2, 2) and torch.isfinite(pred.logits).all()


def test_collapsed_posterior_is_deterministic_and_equals_the_mean():
    collapsed = _factor(init_lambda=0.01, max_lambda=0.0)
    collapsed.settings.max_q_std = 0.0  # q(u) collapsed to its mean
    with torch.no_grad():
        first, second = collapsed(), collapsed()
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        torch.testing.assert_close(first, collapsed(stochastic=False))
        assert float(collapsed.kl_conditional()) == 0.0
        wide = _factor()
        assert not torch.allclose(wide(), wide())


@pytest.mark.parametrize("q", ["diagonal", "full", "flow"])
def test_parameter_count_formula_matches_the_modules(q):
    settings = InducingSettings(q_inducing=q)
    factor = InducingFactor(7, 5, settings)
    assert sum(p.numel() for p in factor.parameters()) == inducing_factor_parameter_count(7, 5, settings)
    frozen = InducingSettings(learn_lambda=False)
    assert sum(p.numel() for p in InducingFactor(7, 5, frozen).parameters()) == \
        inducing_factor_parameter_count(7, 5, frozen)


def test_qwen_7b_count_on_the_meta_device_matches_the_module_and_the_papers_order():
    backbone = meta_backbone(QWEN_7B)
    assert backbone.num_layers == 28 and backbone.hidden_size == 3584
    counts = BayesianLora.count_parameters(backbone, num_classes=4)  # defaults: q_proj, k_proj, the answer head
    modules = target_modules(backbone, LoraSettings(target_modules=["q_proj", "k_proj"]))
    assert len(modules) == 56
    adapter = InducingLoraAdapter(modules, 8, 16, InducingSettings(), head_ids=torch.arange(4), hidden=3584,
                                  device="meta")
    assert sum(p.numel() for p in adapter.parameters()) == counts["bayesian_lora"]
    assert adapter.factors[HEAD_KEY]["B"].z_row.shape == (9, 4)  # inducing rows over the K answer rows only
    assert counts["lora"] == 28 * 8 * (3584 + 3584) + 28 * 8 * (3584 + 512) + 8 * (3584 + 4)
    assert 2e5 < counts["extra"] < 1e6  # the paper reports ~0.42M extra parameters on a 7B model


@pytest.mark.parametrize("k", [2, 4, 5])
def test_the_answer_heads_parameters_for_k_answer_rows_by_hand(k):
    backbone = meta_backbone(QWEN_7B)
    with_head = BayesianLora.count_parameters(backbone, num_classes=k)["bayesian_lora"]
    without = BayesianLora.count_parameters(backbone, {"answer_head": False})["bayesian_lora"]
    # A (8 x 3584): Z_r 9x8, Z_c 9x3584, D_r 9, D_c 9, mean of U 81, diagonal std of U 81, lambda 1
    a = 9 * 8 + 9 * 3584 + 9 + 9 + 81 + 81 + 1
    # B (K x 8): Z_r 9xK, Z_c 9x8, and the same 181
    b = 9 * k + 9 * 8 + 9 + 9 + 81 + 81 + 1
    assert with_head - without == a + b


def _config(**extra):
    return BayesianLora.make_config({
        "lora": LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]),
        "train": TrainSettings(epochs=4, lr=2e-2, batch_size=8, progress=False, warmup_ratio=0.0),
        "kl_start_epoch": 0, **extra})


def test_bayesian_lora_fits_predicts_reloads_and_collapses(tiny_backbone, toy_splits):
    config = _config(inducing={"prior_std": 1.0, "init_q_std": 0.05, "init_lambda": 0.02})
    config.train.epochs = 2
    post = BayesianLora(config, seed=0)
    report = post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    assert HEAD_KEY in post.adapter.factors and post.adapter.factors[HEAD_KEY]["B"].z_row.shape == (9, 2)
    assert report.trainable_params == sum(p.numel() for p in post.adapter.parameters())
    assert report.extra["extra_params_over_lora"] == report.trainable_params - report.extra["lora_params"]
    assert report.extra["kl_inducing"] > 0 and 0 < report.extra["mean_lambda"] < 0.03
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 4)
    assert pred.logits.shape == (12, 4, 2) and pred.cost.forward_passes == 4
    assert pred.logits.std(dim=1).mean() > 1e-4
    again = BayesianLora(post.config, seed=0)
    again.attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    assert torch.equal(again.predict(loader, 4).logits, pred.logits)
    mean = post.predict(loader, 0)
    assert mean.logits.shape == (12, 1, 2)
    for factor in post.adapter.inducing_factors():
        factor.settings = InducingSettings(**{**vars(factor.settings), "max_lambda": 0.0, "max_q_std": 0.0})
    collapsed = post.predict(loader, 3)
    torch.testing.assert_close(collapsed.logits, mean.logits.expand(-1, 3, -1))


def _mean_nll(post: BayesianLora, loader) -> float:
    pred = post.predict(loader, 0)
    return float(torch.nn.functional.cross_entropy(pred.logits[:, 0], pred.labels))


def test_bayesian_lora_learns_the_toy_task(tiny_backbone, toy_splits):
    config = _config(inducing={"prior_std": 1.0})
    config.train.epochs = 8
    post = BayesianLora(config, seed=0)
    val = make_loader(toy_splits[1], 8)
    post.attach(tiny_backbone)
    post._build(tiny_backbone)  # the same seeded initialisation fit starts from
    before = _mean_nll(post, val)
    post.fit(tiny_backbone, toy_splits[0], toy_splits[1])
    assert _mean_nll(post, val) < before - 0.007  # measured: 0.749 -> 0.735


def test_bad_bayesian_lora_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="q_inducing"):
        BayesianLora(BayesianLora.make_config({"inducing": {"q_inducing": "matrix"}}))
    with pytest.raises(ConfigError, match="flow_hidden"):
        BayesianLora(BayesianLora.make_config({"inducing": {"q_inducing": "flow", "flow_hidden": 32}}))
    with pytest.raises(ConfigError, match="init_lambda"):
        BayesianLora(BayesianLora.make_config({"inducing": {"init_lambda": 0.05}}))
    with pytest.raises(ConfigError, match="unknown key"):
        BayesianLora.make_config({"inducing": {"rank": 9}})
    assert parameter_count({"m": (4, 6)}, 2, InducingSettings())["lora"] == 2 * (4 + 6)


def test_params_command_prints_the_counts_and_refuses_methods_without_a_count(capsys):
    from benchmarks.cli import main

    assert main(["params", "bayesian_lora", "--model", QWEN_7B, "--set", "answer_head=false",
                 "--set", "lora.target_modules=[q_proj]"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.strip().splitlines())
    per_layer = 2 * inducing_factor_parameter_count(8, 3584, InducingSettings())
    assert int(printed["bayesian_lora"].replace(",", "")) == 28 * per_layer
    assert int(printed["extra"].replace(",", "")) == 28 * (per_layer - 8 * 2 * 3584)
    assert main(["params", "map", "--model", QWEN_7B]) == 2
    assert "does not count its parameters" in capsys.readouterr().err


def test_factor_draws_stay_float32_under_bf16_autocast():
    factor = InducingFactor(64, 8, InducingSettings())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight, kl = factor(stochastic=False), factor.kl()
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on
    assert weight.dtype == torch.float32 and kl.dtype == torch.float32
    torch.testing.assert_close(weight, factor(stochastic=False))


def test_kl_weight_is_the_authors_per_minibatch_schedule(tiny_backbone):
    from baselines.bayesian_lora import BayesianLoraHooks

    config = BayesianLora.make_config({"train": {"grad_accum": 2}})
    assert config.kl_weight == 0.1 and config.kl_start_epoch == 2 and config.lora.target_modules == ["q_proj", "k_proj"]
    modules = target_modules(tiny_backbone, LoraSettings(r=2, layers=[0]))
    adapter = InducingLoraAdapter(modules, 2, 4, InducingSettings())
    hooks = BayesianLoraHooks(tiny_backbone, adapter, config, n_train=80, batches_per_epoch=10)
    # 2 minibatches per step: steps 0-9 are epochs 0-1 (no KL), step 10 starts epoch 2
    assert [hooks.kl_scale(s) for s in (0, 9, 10, 30)] == [0.0, 0.0, 0.1 / 10, 0.1 / 10]
    per_example = BayesianLora.make_config({"kl_scaling": "per_example", "kl_start_epoch": 0, "kl_weight": 1.0})
    assert BayesianLoraHooks(tiny_backbone, adapter, per_example, 80, 10).kl_scale(0) == 1 / 80
