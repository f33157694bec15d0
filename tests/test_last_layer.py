"""Feature cache, VBLL and PoLAR-VBLL: one backbone pass at predict, the VBLL predictive against its
closed form and the vbll package, the landing field, save/reload."""

from __future__ import annotations

import pytest
import torch
import vbll

from baselines.polar import PolarAdapter, landing_field, orthogonality_error
from baselines.vbll_head import VbllHead, VbllSettings
from bayeslora import ConfigError, get_method
from bayeslora.artifacts import ArtifactStore
from bayeslora.backbone import load_backbone, target_modules
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader
from bayeslora.features import cached_features

from .conftest import perturb_adapter, tiny_model_settings

TRAIN = TrainSettings(epochs=2, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0)
LORA = LoraSettings(r=2, alpha=4, dropout=0.0)
FAST = {"lora": LORA, "train": TRAIN}
HEAD_METHODS = ["vbll", "polar_vbll", "laplace_last_layer"]


# ---------------------------------------------------------------- feature cache
def test_feature_cache_is_reused_and_invalidated_by_the_adapter(tiny_backbone, toy_splits, tmp_path):
    train, _, _ = toy_splits
    store = ArtifactStore(tmp_path)
    tiny_backbone.add_lora("feat", LORA, seed=0)
    perturb_adapter(tiny_backbone, "feat")
    first = cached_features(tiny_backbone, train, 8, "feat", store)
    passes = tiny_backbone.num_forward_passes
    again = cached_features(tiny_backbone, train, 8, "feat", store)
    assert tiny_backbone.num_forward_passes == passes and store.hits == 1  # read back, no backbone pass
    torch.testing.assert_close(again.features, first.features)
    base = cached_features(tiny_backbone, train, 8, None, store)
    assert not torch.allclose(base.features, first.features)  # the adapter is part of the key
    perturb_adapter(tiny_backbone, "feat", scale=0.5)
    changed = cached_features(tiny_backbone, train, 8, "feat", store)
    assert store.hits == 1 and not torch.allclose(changed.features, first.features)  # retrained: recomputed
    batch = next(iter(make_loader(train, len(train))))
    with torch.no_grad():
        torch.testing.assert_close(changed.features, tiny_backbone.features(batch), atol=1e-5, rtol=1e-5)
    assert changed.labels.tolist() == train.labels.tolist() and changed.choice_mask.all()


# ---------------------------------------------------------------- VBLL head
def _head(parameterization: str, hidden: int = 6, classes: int = 3) -> VbllHead:
    torch.manual_seed(0)
    head = VbllHead(hidden, classes, 0.1, VbllSettings(parameterization=parameterization))
    with torch.no_grad():  # move away from vbll's near-deterministic init
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


def _closed_form(head: VbllHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean_k = m_k^T x + noise mean_k, var_k = x^T Sigma_k x + sigma_k^2, from the raw parameters."""
    layer = head.layer
    chol_diag = layer.W_logdiag.exp()
    if isinstance(layer.W(), vbll.utils.distributions.DenseNormal):
        chol = torch.tril(layer.W_offdiag, -1) + torch.diag_embed(chol_diag)
        cov = chol @ chol.transpose(-1, -2)
    elif isinstance(layer.W(), vbll.utils.distributions.LowRankNormal):
        cov = layer.W_offdiag @ layer.W_offdiag.transpose(-1, -2) + torch.diag_embed(chol_diag)
    else:
        cov = torch.diag_embed(chol_diag**2)
    mean = x @ layer.W_mean.T + layer.noise_mean
    var = torch.einsum("bh,khg,bg->bk", x, cov, x) + layer.noise_logdiag.exp() ** 2
    return mean, var


@pytest.mark.parametrize("parameterization", ["dense", "diagonal", "lowrank"])
def test_vbll_predictive_matches_closed_form_and_package(parameterization):
    head = _head(parameterization)
    x = torch.randn(5, 6)
    mean, var = _closed_form(head, x)
    with torch.no_grad():
        pred = head.logit_predictive(x)
        torch.testing.assert_close(pred.mean, mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred.covariance_diagonal, var, atol=1e-5, rtol=1e-5)
        samples = head.sample_logits(x, torch.ones(5, 3, dtype=torch.bool), 200_000, torch.Generator().manual_seed(0))
        torch.testing.assert_close(samples.mean(1), mean, atol=0.02, rtol=0.01)
        torch.testing.assert_close(samples.var(1), var, atol=0.02, rtol=0.02)
        torch.manual_seed(1)
        package = head.layer.predictive(x, n_samples=200_000)
        ours = samples.softmax(-1).mean(1)
    torch.testing.assert_close(ours, package, atol=5e-3, rtol=0)


def test_vbll_elbo_is_the_package_loss_and_ignores_absent_options():
    head = _head("dense")
    x, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 0, 1, 1, 0])
    full = torch.ones(7, 3, dtype=torch.bool)
    torch.testing.assert_close(head.loss(x, y, full), head.layer(x).train_loss_fn(y))
    two = full.clone()
    two[:, 2] = False
    y2 = y.clamp(max=1)
    bound = head.expected_log_likelihood(x, y2, two)
    with torch.no_grad():
        head.layer.W_mean[2].add_(5.0)  # an absent option's row cannot change the bound
        head.layer.W_logdiag[2].add_(2.0)
    torch.testing.assert_close(head.expected_log_likelihood(x, y2, two), bound)
    assert not torch.allclose(head.expected_log_likelihood(x, y, full), bound)
    samples = head.sample_logits(x, two, 4)
    assert (samples[..., 2] < -1e3).all()


# ---------------------------------------------------------------- one backbone pass per example
def _fit(method: str, backbone, splits, **config):
    train, val, _ = splits
    post = get_method(method)({**FAST, **config}, seed=0)
    report = post.fit(backbone, train, val)
    return post, report


@pytest.mark.parametrize("method", HEAD_METHODS)
@pytest.mark.parametrize("num_samples", [1, 10])
def test_head_methods_run_the_backbone_once_per_batch(method, num_samples, tiny_backbone, toy_splits, monkeypatch):
    post, _ = _fit(method, tiny_backbone, toy_splits)
    test = toy_splits[2]
    calls = []
    features = tiny_backbone.features
    monkeypatch.setattr(tiny_backbone, "features", lambda batch: calls.append(len(batch["labels"])) or features(batch))
    pred = post.predict(make_loader(test, 4), num_samples)
    assert calls == [4, 4, 4]  # one call per batch of 4, whatever S is
    assert pred.logits.shape == (len(test), num_samples, 2) and pred.cost.forward_passes == 1
    if num_samples > 1:
        assert pred.logits.std(1).min() > 0


@pytest.mark.parametrize("method", ["vbll", "polar_vbll"])
def test_head_methods_reload_exactly(method, tiny_backbone, toy_splits):
    post, report = _fit(method, tiny_backbone, toy_splits)
    assert report.posterior_params > 0 and report.trainable_params >= report.posterior_params
    loader = make_loader(toy_splits[2], 4)
    expected = post.predict(loader, 5).logits
    state = post.state_dict()
    post.release()
    again = get_method(method)(FAST, seed=0).attach(tiny_backbone)
    again.load_state_dict(state)
    torch.testing.assert_close(again.predict(loader, 5).logits, expected)


@pytest.mark.parametrize("method", ["vbll", "polar_vbll", "lora_vbll", "laplace_last_layer"])
def test_head_methods_score_a_set_with_other_answer_tokens(method, tiny_backbone, toy_splits):
    post, _ = _fit(method, tiny_backbone, toy_splits)
    batch = next(iter(make_loader(toy_splits[2], 4)))
    a, b = batch["answer_ids"].tolist()  # fitted on " A", " B"
    unseen = next(t for t in range(5, 100) if t not in (a, b))
    other = dict(batch, answer_ids=torch.tensor([b, unseen, a]), choice_mask=torch.ones(4, 3, dtype=torch.bool))
    same = post.predict([batch], 4).logits
    mapped = post.predict([other], 4).logits  # same prompts, same seeded draws
    assert mapped.shape == (4, 4, 3)
    torch.testing.assert_close(mapped[..., 0], same[..., 1])  # " B": the head's column for " B"
    torch.testing.assert_close(mapped[..., 2], same[..., 0])  # " A"
    assert float(mapped[..., 1].std(1).max()) == 0.0  # a token the head never saw: the LM head's logit, no noise
    post.release()


def test_vbll_keeps_the_prior_scale_with_the_lowest_validation_nll(tiny_backbone, toy_splits):
    post, report = _fit("vbll", tiny_backbone, toy_splits, prior_scale_grid=[0.01, 100.0], features="base")
    assert report.extra["prior_scale"] in (0.01, 100.0)
    single, _ = _fit("vbll", tiny_backbone, toy_splits, prior_scale_grid=[report.extra["prior_scale"]],
                     features="base")
    assert single.head.layer.prior_scale == post.head.layer.prior_scale
    worse = 100.0 if report.extra["prior_scale"] == 0.01 else 0.01
    other, other_report = _fit("vbll", tiny_backbone, toy_splits, prior_scale_grid=[worse], features="base")
    assert other_report.extra["head_val_nll"] >= report.extra["head_val_nll"]


def test_bad_vbll_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="parameterization"):
        get_method("vbll")({"vbll": {"parameterization": "full"}})
    with pytest.raises(ConfigError, match="features"):
        get_method("vbll")({"features": "lm"})
    with pytest.raises(ConfigError, match="schedule"):
        get_method("polar_vbll")({"schedule": "sometimes"})


# ---------------------------------------------------------------- PoLAR
def test_polar_adapter_starts_at_the_base_model_and_adds_x_theta_y(tiny_backbone):
    modules = target_modules(tiny_backbone, LORA)
    assert sorted(modules) == [f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    adapter = PolarAdapter(modules, r=2, alpha=4, seed=0)
    assert adapter.orthogonality_error() < 1e-5
    batch = {"input_ids": torch.randint(0, 100, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    with torch.no_grad():
        base = tiny_backbone.features(batch)
        with adapter.active():
            torch.testing.assert_close(tiny_backbone.features(batch), base)  # Theta = 0
        key, module = "layers__0__self_attn__q_proj", modules["layers.0.self_attn.q_proj"]
        adapter.Theta[key].normal_()
        x = torch.randn(3, module.in_features)
        with adapter.active():
            adapted = module(x)
            assert not torch.allclose(tiny_backbone.features(batch), base)
        delta_w = 2.0 * adapter.X[key] @ adapter.Theta[key] @ adapter.Y[key].T
        torch.testing.assert_close(adapted, module(x) + x @ delta_w.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny_backbone.features(batch), base)  # hooks removed on exit


def test_landing_field_is_tangent_on_the_manifold_and_pulls_back_off_it():
    torch.manual_seed(0)
    p = torch.linalg.qr(torch.randn(10, 3))[0]
    g = torch.randn(10, 3)
    field = landing_field(p, g, 1.0)
    torch.testing.assert_close(p.T @ field + field.T @ p, torch.zeros(3, 3), atol=1e-5, rtol=0)  # skew: tangent
    off = 1.1 * p
    step = off - 0.05 * landing_field(off, torch.zeros_like(off), 1.0)
    assert orthogonality_error(step) < orthogonality_error(off)


def test_landing_keeps_x_and_y_orthogonal_while_the_loss_falls(tiny_backbone, toy_splits):
    train_settings = TrainSettings(epochs=3, lr=1e-3, batch_size=8, progress=False, warmup_ratio=0.0)
    post, report = _fit("polar_vbll", tiny_backbone, toy_splits, train=train_settings, schedule="joint",
                        head_lr=1e-3, stiefel_lr=3e-4)
    history = post.train_result.history
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert report.extra["orthogonality_error"] < 1e-3
    unlanded, unlanded_report = _fit("polar_vbll", tiny_backbone, toy_splits, train=train_settings,
                                     schedule="joint", head_lr=1e-3, stiefel_lr=3e-4, landing_strength=1e-12)
    assert report.extra["orthogonality_error"] < unlanded_report.extra["orthogonality_error"]


def test_polar_below_the_trunk_cache_is_refused(toy_splits):
    backbone = load_backbone(tiny_model_settings("llama", num_hidden_layers=4))
    backbone.configure_trunk_cache("auto", LoraSettings(r=2, alpha=4, dropout=0.0, layers={"top": 2}))
    with pytest.raises(ConfigError, match="below the trunk cache's layer 2"):
        _fit("polar_vbll", backbone, toy_splits)  # LORA adapts every layer, including 0 and 1
