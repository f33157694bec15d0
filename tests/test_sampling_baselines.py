"""Deep ensembles, MC dropout, temperature scaling and the shared multi-sample path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from baselines.temperature import fit_temperature
from bayeslora import ConfigError, get_method
from bayeslora.artifacts import ArtifactStore
from bayeslora.data import make_loader
from bayeslora.metrics import classification_metrics
from bayeslora.predict import sample_class_logits


def _predict(posterior, split, s=4, seed=0):
    torch.manual_seed(seed)
    return posterior.predict(make_loader(split, 5), s)


def _metrics(pred):
    return classification_metrics(pred.logits, pred.labels)


def test_ensemble_of_identical_members_has_zero_mi_and_the_map_metrics(tiny_backbone, toy_splits, fast_adapter_config):
    train, val, test = toy_splits
    map_post = get_method("map")(fast_adapter_config, seed=0)
    map_post.fit(tiny_backbone, train, val)
    map_pred = _predict(map_post, test)
    adapter = map_post.state_dict()["adapter"]

    ensemble = get_method("ensemble")({**fast_adapter_config, "members": 3}, seed=0).attach(tiny_backbone)
    ensemble.load_state_dict({"members": {s: adapter for s in ensemble.member_seeds()}})
    pred = _predict(ensemble, test)
    assert pred.logits.shape == (len(test), 3, 2)
    ens, ref = _metrics(pred), _metrics(map_pred)
    assert ens["mi"] == pytest.approx(0.0, abs=1e-6)
    for key in ("acc", "nll", "brier", "ece"):
        assert ens[key] == pytest.approx(ref[key], abs=1e-6)


def test_ensemble_reuses_cached_map_adapters_and_distinct_members_disagree(tiny_backbone, toy_splits,
                                                                          fast_adapter_config, tmp_path):
    train, val, test = toy_splits
    store = ArtifactStore(tmp_path)
    for seed in (0, 1):
        get_method("map")(fast_adapter_config, seed=seed, artifacts=store).fit(tiny_backbone, train, val)
    ensemble = get_method("ensemble")({**fast_adapter_config, "members": 2}, seed=0, artifacts=store)
    report = ensemble.fit(tiny_backbone, train, val)
    assert report.reused_cache and report.train_steps > 0 and report.extra["members_reused"] == 2
    assert ensemble.member_seeds() == [0, 1]
    assert get_method("ensemble")({"members": 2}, seed=1).member_seeds() == [2, 3]  # disjoint per seed
    pred = _predict(ensemble, test)
    assert _metrics(pred)["mi"] > 1e-6
    # save and reload into a fresh instance: the same predictive
    state = ensemble.state_dict()
    ensemble.release()
    again = get_method("ensemble")({**fast_adapter_config, "members": 2}, seed=0).attach(tiny_backbone)
    again.load_state_dict(state)
    torch.testing.assert_close(_predict(again, test).logits, pred.logits)


def test_mc_dropout_with_p_zero_equals_map(tiny_backbone, toy_splits, fast_adapter_config):
    train, val, test = toy_splits
    config = {**fast_adapter_config, "lora": dataclasses.replace(fast_adapter_config["lora"], dropout=0.1)}
    map_post = get_method("map")(config, seed=0)
    map_post.fit(tiny_backbone, train, val)
    map_logits = _predict(map_post, test).logits
    mc = get_method("mc_dropout")({**config, "p": 0.0}, seed=0).attach(tiny_backbone)
    mc.load_state_dict(map_post.state_dict())
    pred = _predict(mc, test, s=4)
    assert pred.logits.shape == (len(test), 4, 2)
    torch.testing.assert_close(pred.logits, map_logits.expand(-1, 4, -1))
    assert _metrics(pred)["mi"] == pytest.approx(0.0, abs=1e-9)


def test_mc_dropout_samples_vary_and_stacked_forwards_give_s_samples(tiny_backbone, toy_splits, fast_adapter_config):
    train, val, test = toy_splits
    config = {**fast_adapter_config, "lora": dataclasses.replace(fast_adapter_config["lora"], dropout=0.3),
              "samples_per_forward": 3}
    mc = get_method("mc_dropout")(config, seed=0)
    mc.fit(tiny_backbone, train, val)
    passes = tiny_backbone.num_forward_passes
    pred = _predict(mc, test, s=5)  # 5 = 3 + 2: an uneven last stack
    assert pred.logits.shape == (len(test), 5, 2)
    assert pred.cost.forward_passes == 5 and tiny_backbone.num_forward_passes - passes == 5 * len(test)
    assert _metrics(pred)["mi"] > 1e-6
    # dropout modules are back in eval mode and at their training rate
    drops = [m for n, m in tiny_backbone.lm.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert drops and all(not m.training and m.p == 0.3 for m in drops)


def test_mc_dropout_without_dropout_is_a_clear_error(tiny_backbone, toy_splits, fast_adapter_config):
    train, val, test = toy_splits
    mc = get_method("mc_dropout")(fast_adapter_config, seed=0)  # lora.dropout = 0
    mc.fit(tiny_backbone, train, val)
    with pytest.raises(ConfigError, match="lora.dropout > 0"):
        _predict(mc, test)


def test_sample_class_logits_matches_one_pass_per_sample(tiny_backbone, toy_splits):
    batch = next(iter(make_loader(toy_splits[2], 6)))
    with torch.no_grad():
        single = tiny_backbone.class_logits(batch)
        stacked = sample_class_logits(tiny_backbone, batch, 4, samples_per_forward=3)
    torch.testing.assert_close(stacked, single[:, None].expand(-1, 4, -1), atol=1e-5, rtol=1e-5)


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(20000, 3, generator=g)
    labels = torch.multinomial(F.softmax(logits, -1), 1, generator=g).squeeze(1)
    temperature, before, after = fit_temperature(4.0 * logits, labels)  # 4x overconfident
    assert temperature == pytest.approx(4.0, rel=0.05)
    assert after < before


def test_fit_temperature_never_raises_nll():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    temperature, before, after = fit_temperature(logits, labels)
    assert after <= before + 1e-12
    assert F.cross_entropy(logits / temperature, labels).item() == pytest.approx(after, abs=1e-6)


def test_temperature_scaling_lowers_or_keeps_val_nll_and_reloads(tiny_backbone, toy_splits, fast_adapter_config):
    train, val, test = toy_splits
    post = get_method("temperature")(fast_adapter_config, seed=0)
    report = post.fit(tiny_backbone, train, val)
    assert report.extra["val_nll_scaled"] <= report.extra["val_nll_map"] + 1e-9
    pred = _predict(post, test)
    assert pred.num_samples == 1
    again = get_method("temperature")(fast_adapter_config, seed=0).attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    torch.testing.assert_close(_predict(again, test).logits, pred.logits)
    with pytest.raises(ConfigError, match="validation split"):
        get_method("temperature")(fast_adapter_config, seed=1).fit(tiny_backbone, train, None)
