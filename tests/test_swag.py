"""SWAG statistics, the LoRA-XS adapter, and the swag_lora / blora_xs posteriors on a tiny model."""

from __future__ import annotations

import pytest
import torch

from baselines.lora_xs import LoraXsAdapter, lora_xs_factors, truncated_svd
from baselines.swag import SwagSettings, SwagStatistics, flatten, unflatten
from baselines.swag_lora import BLoraXs, SwagLora
from bayeslora import ConfigError
from bayeslora.artifacts import ArtifactStore
from bayeslora.backbone import target_modules
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)
TRAIN = TrainSettings(epochs=2, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0)


# -- SWAG statistics -------------------------------------------------------------------------------------
def _filled(dim: int = 6, n: int = 12, max_rank: int = 4, seed: int = 0) -> tuple[SwagStatistics, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    snapshots = torch.randn(n, dim, generator=g) * torch.linspace(0.5, 2.0, dim) + 3.0
    stats = SwagStatistics(dim, max_rank)
    for theta in snapshots:
        stats.collect(theta)
    return stats, snapshots


def test_swag_moments_and_deviations_match_the_snapshots():
    stats, snaps = _filled()
    s64 = snaps.double()
    assert torch.allclose(stats.mean, s64.mean(0)) and torch.allclose(stats.sq_mean, (s64**2).mean(0))
    assert torch.allclose(stats.variance, s64.var(0, unbiased=False))
    running_means = s64.cumsum(0) / torch.arange(1, 13, dtype=torch.float64)[:, None]
    assert stats.rank == 4
    assert torch.allclose(stats.deviations.double(), (s64 - running_means)[-4:], atol=1e-6)
    assert stats.num_stored() == 6 * (2 + 4)


def test_swag_with_scale_zero_samples_the_mean():
    stats, _ = _filled()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        assert torch.equal(stats.sample(0.0, g), stats.mean.float())


@pytest.mark.parametrize("covariance", ["low_rank", "diagonal"])
def test_swag_sample_covariance_is_diagonal_plus_low_rank(covariance):
    stats, _ = _filled()
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([stats.sample(0.5, g, covariance) for _ in range(40_000)]).double()
    expected = stats.covariance_matrix(0.5, covariance)
    assert torch.allclose(draws.mean(0), stats.mean, atol=0.03)
    assert torch.allclose(torch.cov(draws.T), expected, atol=0.04 * float(expected.abs().max()))
    if covariance == "diagonal":
        assert torch.count_nonzero(expected - torch.diag(torch.diagonal(expected))) == 0
    else:  # the low-rank part is really there
        assert float((expected - torch.diag(torch.diagonal(expected))).abs().max()) > 0.05


def test_flatten_round_trip_and_state():
    tensors = {"b": torch.randn(3, 2), "a": torch.randn(4)}
    back = unflatten(flatten(tensors), tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="entries"):
        unflatten(torch.zeros(5), tensors)
    stats, _ = _filled()
    again = SwagStatistics.from_state(stats.state_dict())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(stats.sample(1.0, g1), again.sample(1.0, g2))


def test_swag_settings_are_checked():
    with pytest.raises(ConfigError, match="covariance"):
        SwagSettings(covariance="full").check()
    with pytest.raises(ConfigError, match="collect_every"):
        SwagSettings(collect_every=0).check()
    assert SwagSettings().interval(48) == 4 and SwagSettings(max_rank=10).interval(3) == 1
    assert SwagSettings(collect_every=7).interval(48) == 7


# -- LoRA-XS ---------------------------------------------------------------------------------------------
def test_svd_factors_reconstruct_the_truncated_weight():
    w = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    b, a = truncated_svd(w, 3)
    assert b.shape == (12, 3) and a.shape == (3, 8)
    assert torch.allclose(b @ a, u[:, :3] @ torch.diag(s[:3]) @ vh[:3], atol=1e-5)
    assert torch.allclose(b.T @ b, torch.eye(3), atol=1e-5)  # B = U_r is orthonormal
    # Eckart-Young: the rank-r error is the norm of the dropped singular values; full rank is exact
    assert float(torch.linalg.matrix_norm(w - b @ a)) == pytest.approx(float(s[3:].norm()), rel=1e-4)
    full_b, full_a = truncated_svd(w, 8)
    assert torch.allclose(full_b @ full_a, w, atol=1e-5)
    with pytest.raises(ConfigError, match="rank"):
        truncated_svd(w, 9)


def test_lora_xs_adapter_adds_scaled_b_r_a_inside_active_only(tiny_backbone, tmp_path):
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj"], layers=[1])
    modules = target_modules(tiny_backbone, lora)
    store = ArtifactStore(tmp_path)
    factors = lora_xs_factors(tiny_backbone, lora, store)
    assert lora_xs_factors(tiny_backbone, lora, store).keys() == factors.keys()  # from the cache
    assert len(list((tmp_path / "lora_xs_svd").glob("*"))) == 1
    adapter = LoraXsAdapter(modules, factors, 4, 8, seed=0)
    (key, module), = modules.items()
    safe = key.replace(".", "__")
    assert float(adapter.R[safe].detach().std()) < 1e-4
    with torch.no_grad():
        adapter.R[safe].normal_()
    x = torch.randn(3, module.in_features)
    base = module(x)
    b, a = factors[key]
    with adapter.active():
        adapted = module(x)
    assert torch.allclose(adapted, base + x @ (2.0 * b @ adapter.R[safe] @ a).T, atol=1e-5)
    assert torch.allclose(adapter.delta_weight(safe), 2.0 * b @ adapter.R[safe] @ a)
    assert torch.equal(module(x), base)  # hook removed on exit
    with torch.no_grad():  # changed weights: the cached SVD no longer applies
        module.weight.mul_(2.0)
    again = lora_xs_factors(tiny_backbone, lora, store)
    assert len(list((tmp_path / "lora_xs_svd").glob("*"))) == 2
    new_b, new_a = again[key]
    assert torch.allclose(new_b @ new_a, 2.0 * b @ a, atol=1e-5)


# -- the posteriors on a tiny model ----------------------------------------------------------------------
def _fit(cls, backbone, splits, tmp_path, **config):
    post = cls(cls.make_config({"lora": LORA, "train": TRAIN, **config}), seed=0, artifacts=ArtifactStore(tmp_path))
    report = post.fit(backbone, splits[0], splits[1])
    return post, report


@pytest.mark.parametrize("cls", [SwagLora, BLoraXs])
def test_swag_posteriors_fit_sample_and_reload_exactly(cls, tiny_backbone, toy_splits, tmp_path):
    post, report = _fit(cls, tiny_backbone, toy_splits, tmp_path, swag={"epochs": 2, "max_rank": 3})
    assert report.extra["snapshots"] == 4 and report.extra["swag_rank"] == 3  # 8 SWA steps, every 2
    assert report.extra["swa_steps"] == 8 and report.extra["collect_every"] == "2"
    assert report.posterior_params == report.extra["posterior_dim"] * (2 + 3)
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 5)
    assert pred.logits.shape == (12, 5, 2) and pred.cost.forward_passes == 5
    assert pred.logits.std(dim=1).mean() > 1e-5  # the samples differ
    state = post.state_dict()
    again = cls(post.config, seed=0, artifacts=ArtifactStore(tmp_path))
    again.attach(tiny_backbone)
    post.release()
    again.load_state_dict(state)
    assert torch.equal(again.predict(loader, 5).logits, pred.logits)
    again.release()


@pytest.mark.parametrize("cls", [SwagLora, BLoraXs])
def test_scale_zero_predicts_the_swa_mean(cls, tiny_backbone, toy_splits, tmp_path):
    post, _ = _fit(cls, tiny_backbone, toy_splits, tmp_path, swag={"scale": 0.0, "max_rank": 3})
    loader = make_loader(toy_splits[2], 4)
    pred = post.predict(loader, 3)
    assert torch.equal(pred.logits[:, 0], pred.logits[:, 2])
    mean_only = post.predict(loader, 0)  # num_samples = 0: the SWA mean itself
    torch.testing.assert_close(pred.logits[:, :1], mean_only.logits, atol=1e-6, rtol=1e-6)
    post.release()


def test_blora_xs_trains_far_fewer_parameters_than_lora(tiny_backbone, toy_splits, tmp_path):
    xs, xs_report = _fit(BLoraXs, tiny_backbone, toy_splits, tmp_path, swag={"max_rank": 3})
    lora, lora_report = _fit(SwagLora, tiny_backbone, toy_splits, tmp_path, swag={"max_rank": 3})
    n_modules = len(target_modules(tiny_backbone, LORA))
    assert xs_report.trainable_params == n_modules * LORA.r**2 == xs_report.extra["posterior_dim"]
    assert xs_report.trainable_params < lora_report.trainable_params
    assert xs_report.posterior_params < lora_report.posterior_params
    xs.release()
    lora.release()


@pytest.mark.parametrize(("batches", "grad_accum", "epochs"), [(4, 1, 3), (5, 2, 3), (3, 3, 4), (7, 3, 2)])
def test_per_epoch_collection_takes_one_snapshot_per_epoch(tiny_backbone, batches, grad_accum, epochs):
    from baselines.swag_lora import SwagHooks

    hooks = SwagHooks(tiny_backbone, {}, SwagStatistics(1, 5), SwagSettings(collect="epoch"))
    hooks.on_train_begin(total_steps=100)
    taken, consumed, step = 0, 0, 0
    while consumed < epochs * batches:  # the loop's epoch counter after each step of grad_accum minibatches
        consumed = min(consumed + grad_accum, epochs * batches)
        step += 1
        taken += hooks.due(step, consumed / batches)
    assert taken == epochs


def test_swag_lora_with_the_reference_schedule_collects_once_per_epoch(tiny_backbone, toy_splits, tmp_path):
    post, report = _fit(SwagLora, tiny_backbone, toy_splits, tmp_path,
                        swag={"epochs": 3, "collect": "epoch", "max_rank": 5, "scale": 1.0})
    assert report.extra["snapshots"] == 3 and report.extra["collect_every"] == "epoch"
    assert report.extra["swa_steps"] == 12  # 4 minibatches per epoch
    post.release()


def test_swa_phase_that_collects_nothing_is_a_clear_error(tiny_backbone, toy_splits, tmp_path):
    with pytest.raises(RuntimeError, match="collected no snapshot; lower swag.collect_every"):
        _fit(SwagLora, tiny_backbone, toy_splits, tmp_path, swag={"collect_every": 50})
