"""TFB against hand computations: the SVD rewrite keeps the adapter, the noise has per-row std beta / s_i and
is isotropic in B's column space, the search returns the largest beta within tolerance, and on the tiny
model zero noise reproduces MAP and a saved posterior predicts the same."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.tfb import Tfb, draw_weights, largest_within, row_std, svd_rewrite
from bayeslora import ConfigError, get_method
from bayeslora.data import make_loader

from .conftest import perturb_adapter


def random_state(seed: int = 0, d_out: int = 6, d_in: int = 5, r: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q.lora_A.weight": torch.randn(r, d_in, generator=g), "q.lora_B.weight": torch.randn(d_out, r, generator=g),
            "v.lora_A.weight": torch.randn(r, d_in, generator=g), "v.lora_B.weight": torch.randn(d_out, r, generator=g)}


def test_the_svd_rewrite_keeps_the_product_and_orthogonalises_b():
    state = random_state()
    rewritten, singular = svd_rewrite(state)
    for m in ("q", "v"):
        a, b = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
        a2, b2 = rewritten[f"{m}.lora_A.weight"], rewritten[f"{m}.lora_B.weight"]
        assert torch.allclose(b2 @ a2, b @ a, atol=1e-5)
        s = singular[f"{m}.lora_A.weight"]
        assert torch.allclose(b2.T @ b2, torch.diag(s**2), atol=1e-4)  # B' = U diag(s): orthogonal columns
        assert torch.allclose(s, torch.linalg.svdvals(b), atol=1e-5)


def test_noise_has_row_std_beta_over_s_and_is_isotropic_in_the_column_space_of_b():
    state, beta = random_state(1), 0.3
    rewritten, singular = svd_rewrite(state)
    s = singular["q.lora_A.weight"]
    assert torch.allclose(row_std(s, beta), beta / s)
    assert row_std(torch.tensor([2.0, 0.0]), beta).tolist() == pytest.approx([0.15, 0.0])  # no noise at s_i = 0
    draws = draw_weights(rewritten, singular, beta, 4000, seed=0)
    noise = torch.stack([d["q.lora_A.weight"] - rewritten["q.lora_A.weight"] for d in draws])  # (S, r, d_in)
    assert torch.allclose(noise.std(dim=(0, 2)), beta / s, rtol=0.05)
    # the update's noise B' (A'_s - A') = beta U E: its covariance over S is beta^2 U U^T per column
    b2 = rewritten["q.lora_B.weight"]
    u = b2 / s
    update = torch.einsum("or,sri->soi", b2, noise)
    cov = torch.einsum("soi,spi->op", update, update) / (update.shape[0] * update.shape[2])
    assert torch.allclose(cov, beta**2 * u @ u.T, atol=0.01)
    assert all(torch.equal(d["q.lora_B.weight"], b2) for d in draws[:3])  # B' is not sampled


def test_largest_within_on_a_monotone_toy():
    calls = []

    def loss(beta: float) -> float:
        calls.append(beta)
        return beta

    found = largest_within(loss, 0.1, 1e-3, 0.2, steps=12)
    assert found <= 0.1 and found == pytest.approx(0.1, abs=0.2 / 2**12) and len(calls) == 2 + 12
    assert largest_within(lambda b: b, 2.0, 1e-3, 0.2, 10) == 0.2  # the whole range passes
    assert largest_within(lambda b: b + 1, 0.5, 1e-3, 0.2, 10) == 0.0  # even beta_min fails: MAP
    stepwise = lambda b: 0.0 if b <= math.exp(-3) else 1.0
    assert largest_within(stepwise, 0.5, 1e-3, 0.2, 40) == pytest.approx(math.exp(-3), rel=1e-9)


def test_zero_noise_is_the_map_adapter_and_a_saved_posterior_predicts_the_same(tiny_backbone, toy_splits,
                                                                                fast_adapter_config):
    train, val, test = toy_splits
    tfb = get_method("tfb")({**fast_adapter_config, "search_steps": 4}, seed=0)
    report = tfb.fit(tiny_backbone, train, val)
    perturb_adapter(tiny_backbone, tfb.map.name)  # a non-trivial adapter (two tiny epochs leave B small)
    tfb.rewritten, tfb.singular = svd_rewrite(tfb.map.state())
    loader = make_loader(test, 5)
    map_logits = tfb.map.use().class_logits
    expected = torch.cat([map_logits(b) for b in loader])
    beta, tfb.beta = tfb.beta, 0.0
    pred = tfb.predict(loader, 3)
    assert torch.allclose(pred.logits, expected[:, None].expand(-1, 3, -1), atol=1e-4)
    tfb.beta = 0.05
    noisy = tfb.predict(loader, 3)
    assert noisy.logits.std(dim=1).mean() > 1e-4
    assert 0.0 <= beta <= 0.2 and report.posterior_params == 1
    assert report.extra["val_loss_beta"] <= report.extra["val_loss_map"] * 1.01 + 1e-9  # the authors' criterion
    state = tfb.state_dict()
    tfb.release()
    again = Tfb(fast_adapter_config, seed=0).attach(tiny_backbone)
    again.load_state_dict(state)
    assert torch.allclose(again.predict(loader, 3).logits, noisy.logits, atol=1e-5)


def test_tfb_needs_a_validation_split_and_an_ordered_range(tiny_backbone, toy_splits, fast_adapter_config):
    train, _, _ = toy_splits
    with pytest.raises(ConfigError, match="validation"):
        get_method("tfb")(fast_adapter_config, seed=0).fit(tiny_backbone, train, None)
    with pytest.raises(ConfigError, match="beta_min"):
        get_method("tfb")({"beta_min": 1.0, "beta_max": 0.1}, seed=0)
