"""Laplace-LoRA through laplace-torch: our predictive is laplace-torch's own, reloads, tunes the prior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.laplace_common import LaplaceSettings, check_memory, glm_logit_samples, split_rows, structure_bytes
from bayeslora import ConfigError, get_method
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader
from bayeslora.features import feature_batch

CONFIG = {"lora": LoraSettings(r=2, alpha=4, dropout=0.0, layers=[1]),
          "train": TrainSettings(epochs=2, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0),
          "prior_steps": 30}


@pytest.fixture()
def fitted(tiny_backbone, toy_splits):
    train, val, test = toy_splits
    post = get_method("laplace_lora")(CONFIG, seed=0)
    report = post.fit(tiny_backbone, train, val)
    return post, report, test


def test_jacobian_chunks_give_the_whole_batch_glm(fitted):
    """One example per Jacobian call (the default, O(B) work instead of O(B^2)) gives the GLM mean
    and variance of the whole batch at once: the rows' Jacobians do not depend on each other, nor on
    the left padding that a smaller batch removes."""
    post, _, test = fitted
    batch = next(iter(make_loader(test, 5)))
    mean, var = post.la._glm_predictive_distribution(batch)
    pieces = [post.la._glm_predictive_distribution(rows) for rows in split_rows(batch, 2)]
    assert [len(rows["labels"]) for rows in split_rows(batch, 2)] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([m for m, _ in pieces]), mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([v for _, v in pieces]), var, atol=1e-6, rtol=1e-3)


def test_predictive_equals_laplace_torch_glm(fitted):
    post, _, test = fitted
    loader = make_loader(test, 4)
    pred = post.predict(loader, 7)
    assert pred.logits.shape == (len(test), 7, 2)
    # the method's samples are glm_logit_samples drawn with a generator seeded by the method's seed
    generator = torch.Generator().manual_seed(post.seed)
    torch.testing.assert_close(pred.logits, torch.cat([glm_logit_samples(post.la, b, 7, generator, 1, antithetic=True)
                                                       for b in loader]))
    # independent draws: their softmax mean is laplace-torch's own MC GLM predictive. laplace-torch's
    # __call__ does not pass `generator` on to its sampler, so both draw from the same seeded global RNG.
    for i, batch in enumerate(loader):
        torch.manual_seed(100 + i)
        ours = glm_logit_samples(post.la, batch, 7).softmax(-1).mean(1)
        torch.manual_seed(100 + i)
        theirs = post.la(batch, pred_type="glm", link_approx="mc", n_samples=7)
        torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)
    # antithetic draws: the first ceil(S/2) are laplace-torch's samples, the rest their reflections
    # through laplace-torch's GLM mean
    batch = next(iter(loader))
    f_mu, _ = post.la._glm_predictive_distribution(batch)
    drawn = post.la.functional_samples(batch, n_samples=4, generator=torch.Generator().manual_seed(5))
    mirrored = glm_logit_samples(post.la, batch, 7, torch.Generator().manual_seed(5), antithetic=True)
    torch.testing.assert_close(mirrored[:, :4], drawn.permute(1, 0, 2).float())
    torch.testing.assert_close(mirrored[:, 4:] + mirrored[:, :3], 2 * f_mu[:, None].float().expand(-1, 3, -1),
                               atol=1e-5, rtol=1e-5)
    # the GLM is centred on the MAP logits: the probit mean and (K = 2) the antithetic sample mean rank
    # classes as MAP does
    map_post = get_method("map")({k: CONFIG[k] for k in ("lora", "train")}, seed=0).attach(post.backbone)
    map_post.load_state_dict({"adapter": post.state_dict()["adapter"]})
    map_class = map_post.predict(loader, 1).logits[:, 0].argmax(-1).tolist()
    probit = torch.cat([post.la(b, pred_type="glm", link_approx="probit") for b in loader])
    assert probit.argmax(-1).tolist() == map_class
    assert post.predict(loader, 6).logits.softmax(-1).mean(1).argmax(-1).tolist() == map_class


def test_prior_optimisation_increases_log_marginal_likelihood(fitted):
    _, report, _ = fitted
    assert report.extra["log_marglik"] > report.extra["log_marglik_init"]
    assert report.extra["prior_precision"] != pytest.approx(1.0)
    assert report.posterior_params > 0 and report.extra["factor_bytes"] > 0


def test_saved_and_reloaded_posterior_predicts_the_same(fitted, tiny_backbone):
    post, _, test = fitted
    expected = post.predict(make_loader(test, 4), 5).logits
    state = post.state_dict()
    post.release()
    again = get_method("laplace_lora")(CONFIG, seed=0).attach(tiny_backbone)
    again.load_state_dict(state)
    torch.testing.assert_close(again.predict(make_loader(test, 4), 5).logits, expected)


def test_kfac_for_qwen25_7b_lora_fits_on_80gb_and_full_does_not():
    hidden, kv, layers, r = 3584, 512, 28, 8  # Qwen2.5-7B, LoRA r=8 on q_proj and v_proj
    shapes = [s for _ in range(layers) for s in ((r, hidden), (hidden, r), (r, hidden), (kv, r))]
    kron = structure_bytes(shapes, "kron")
    assert kron == 4 * 2 * layers * (3 * (r**2 + hidden**2) + r**2 + kv**2)  # bytes * (factors + eigenbases)
    assert kron < 80e9 - 16e9  # next to the bf16 model
    assert structure_bytes(shapes, "full") > 1e12
    params = [nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    with pytest.raises(ConfigError, match="kron"):
        check_memory(params, LaplaceSettings(hessian_structure="full"), torch.device("cpu"))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="hessian_structure"):
        get_method("laplace_lora")({"hessian_structure": "block"})
    with pytest.raises(ConfigError, match="prior_method"):
        get_method("laplace_lora")({"prior_method": "magic"})


def test_last_layer_laplace_one_backbone_pass_matches_laplace_torch_and_reloads(tiny_backbone, toy_splits):
    train, val, test = toy_splits
    post = get_method("laplace_last_layer")(CONFIG, seed=0)
    report = post.fit(tiny_backbone, train, val)
    assert report.posterior_params == 2 * tiny_backbone.hidden_size
    assert report.extra["log_marglik"] >= report.extra["log_marglik_init"]
    assert 1 <= report.extra["centre_rounds"] <= 3 and report.extra["centre_loss"] <= report.extra["centre_loss_start"]
    loader = make_loader(test, 4)
    passes = tiny_backbone.num_forward_passes
    pred = post.predict(loader, 6)
    assert pred.logits.shape == (len(test), 6, 2) and pred.cost.forward_passes == 1
    assert tiny_backbone.num_forward_passes - passes == len(test)  # S samples, one backbone pass each example
    assert pred.logits.std(1).min() > 0
    for i, batch in enumerate(loader):
        features = feature_batch(tiny_backbone, batch)
        torch.manual_seed(i)
        ours = glm_logit_samples(post.la, features, 6).softmax(-1).mean(1)
        torch.manual_seed(i)
        theirs = post.la(features, pred_type="glm", link_approx="mc", n_samples=6)
        torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-6)
    state = post.state_dict()
    post.release()
    again = get_method("laplace_last_layer")(CONFIG, seed=0).attach(tiny_backbone)
    again.load_state_dict(state)
    torch.testing.assert_close(again.predict(loader, 6).logits, pred.logits)


def test_last_layer_posterior_is_centred_at_the_map_of_the_trained_head(tiny_backbone, toy_splits):
    from baselines.laplace_last_layer import regularised_loss

    train, val, _ = toy_splits
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "lm_head"]}
    config = {**CONFIG, "lora": lora, "prior_method": "none", "prior_precision": 2.0}
    post = get_method("laplace_last_layer")(config, seed=0)
    report = post.fit(tiny_backbone, train, val)
    head = post.head
    lora_b = tiny_backbone.lora_parameters(post.map.name)["answer_head_lora.lora_B.weight"]
    assert lora_b.abs().sum() > 0  # MAP trained the lm_head LoRA, and the head started from its update
    batches = [feature_batch(tiny_backbone, b) for b in make_loader(train, 8)]
    x = torch.cat([b["features"] for b in batches]).double()
    y = torch.cat([b["labels"] for b in batches])
    centre = head.delta.weight.detach().double().requires_grad_(True)

    def loss(delta):  # sum CE + (lambda/2)||D||^2 by hand, in float64
        z = x @ (head.base_weight.double() + delta).T
        return torch.nn.functional.cross_entropy(z, y, reduction="sum") + 0.5 * 2.0 * delta.pow(2).sum()

    (grad,) = torch.autograd.grad(loss(centre), centre)
    zero = torch.zeros_like(centre, requires_grad=True)
    (grad_zero,) = torch.autograd.grad(loss(zero), zero)
    assert float(grad.norm()) < 1e-3 * max(1.0, float(grad_zero.norm()))  # ~0 at the centre
    assert float(grad_zero.norm()) > 1e-2  # and not at the pretrained rows
    assert report.extra["centre_grad_norm"] < 1e-3
    assert float(regularised_loss(head, x.float(), y, 2.0)) == pytest.approx(report.extra["centre_loss"], rel=1e-4)
    assert torch.allclose(post.la.mean, head.delta.weight.detach().flatten())  # laplace-torch's mean is D*
    post.release()


@pytest.mark.parametrize("method", ["laplace_lora", "laplace_last_layer"])
@pytest.mark.parametrize("structure", ["kron", "diag", "full"])
def test_every_structure_with_validation_grid_search(method, structure, tiny_backbone, toy_splits):
    train, val, test = toy_splits
    grid = [0.01, 1.0, 100.0]
    post = get_method(method)({**CONFIG, "hessian_structure": structure, "prior_method": "gridsearch",
                               "grid": grid}, seed=0)
    report = post.fit(tiny_backbone, train, val)
    assert report.extra["prior_precision"] == pytest.approx(min(grid, key=lambda g: abs(g - report.extra[
        "prior_precision"])), rel=1e-4)
    pred = post.predict(make_loader(test, 6), 3)
    assert pred.logits.shape == (len(test), 3, 2) and torch.isfinite(pred.logits).all()
    assert tiny_backbone.lm.config._attn_implementation != "eager"  # full switches it only while fitting
