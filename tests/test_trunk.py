"""Trunk cache: cached-path logits equal the full forward, for every method; stale caches are never read."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from bayeslora import ConfigError, available_methods, get_method
from bayeslora.backbone import load_backbone
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import EncodedSplit, make_loader
from bayeslora.profiling import PhaseProfile, filling_cache, own_seconds, phase, recording

from .conftest import perturb_adapter, tiny_model_settings, toy_examples

TOP2 = LoraSettings(r=2, alpha=4, dropout=0.1, layers={"top": 2})


def four_layer_backbone(arch: str, seed: int = 0):
    return load_backbone(tiny_model_settings(arch, num_hidden_layers=4, seed=seed))


def encode(backbone, examples, name="test"):
    return EncodedSplit(examples, backbone.tokenizer, 64, name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_logits_equal_full_forward_with_padding(arch):
    backbone = four_layer_backbone(arch)
    backbone.add_lora("upper", TOP2, seed=0)
    perturb_adapter(backbone, "upper")
    batch = next(iter(make_loader(encode(backbone, toy_examples(10, 3)), 10)))
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        full = backbone.class_logits(batch)
        trunk = backbone.configure_trunk_cache("auto", TOP2)
        assert trunk is not None and trunk.layer == 2
        first = backbone.class_logits(batch)  # misses: computes the trunk
        assert trunk.computed == 10
        second = backbone.class_logits(batch)  # hits only
        assert trunk.computed == 10 and trunk.hits == 10
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, full, atol=1e-5, rtol=1e-5)


def test_partial_hits_in_a_batch_match_full_forward():
    backbone = four_layer_backbone("qwen2")
    backbone.add_lora("upper", TOP2, seed=0)
    perturb_adapter(backbone, "upper")
    examples = toy_examples(12, 4)
    split = encode(backbone, examples)
    full_batch = next(iter(make_loader(split, 12)))
    with torch.no_grad():
        full = backbone.class_logits(full_batch)
        backbone.configure_trunk_cache("auto", TOP2)
        backbone.class_logits(next(iter(make_loader(encode(backbone, examples[::2]), 6))))  # half cached
        mixed = backbone.class_logits(full_batch)
    assert backbone.trunk.computed == 12
    torch.testing.assert_close(mixed, full, atol=1e-5, rtol=1e-5)


def _fast_config(cls, **extra):
    """The method's Config with a tiny LoRA on the top two layers and a short training run."""
    names = {f.name for f in dataclasses.fields(cls.Config)}
    values = dict(extra)
    if "lora" in names:
        values["lora"] = TOP2
    if "train" in names:
        values["train"] = TrainSettings(epochs=1, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0)
    return cls.make_config(values)


def _fit_predict(cls, mode: str, **extra):
    backbone = four_layer_backbone("llama")
    split = lambda n, s, name: encode(backbone, toy_examples(n, s), name)
    train, val, test = split(24, 0, "train"), split(8, 1, "val"), split(10, 2, "test")
    backbone.configure_trunk_cache(mode, TOP2)
    torch.manual_seed(0)
    posterior = cls(_fast_config(cls, **extra), seed=0)
    posterior.fit(backbone, train, val)
    torch.manual_seed(123)
    predictive = posterior.predict(make_loader(test, 5), 3)
    posterior.release()
    return predictive, backbone


BUILTIN_METHODS = sorted(n for n, c in available_methods().items()
                         if c.__module__.startswith(("baselines.", "bayeslora.")))


@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_every_method_predicts_the_same_with_and_without_trunk_cache(method):
    cls = get_method(method)
    off, _ = _fit_predict(cls, "off")
    on, backbone = _fit_predict(cls, "auto")
    assert backbone.trunk is not None and backbone.trunk.computed > 0
    torch.testing.assert_close(on.logits, off.logits, atol=1e-4, rtol=1e-4)


def test_laplace_lora_validation_grid_search_runs_on_the_trunk_cache():
    """The grid search evaluates laplace-torch's GLM predictive under torch.func, where the cache
    cannot look entries up: it gets the trunk states beforehand, as the predictive does."""
    settings = {"prior_method": "gridsearch", "grid": [0.1, 10.0, 1000.0]}
    off, _ = _fit_predict(get_method("laplace_lora"), "off", **settings)
    on, backbone = _fit_predict(get_method("laplace_lora"), "auto", **settings)
    assert backbone.trunk is not None and backbone.trunk.computed > 0
    torch.testing.assert_close(on.logits, off.logits, atol=1e-4, rtol=1e-4)


def test_changed_template_never_reads_stale_entries():
    backbone = four_layer_backbone("llama")
    examples = toy_examples(6, 5)
    reworded = [dataclasses.replace(e, head="Question: ") for e in examples]
    backbone.configure_trunk_cache("auto", TOP2)
    with torch.no_grad():
        backbone.class_logits(next(iter(make_loader(encode(backbone, examples), 6))))
        batch = next(iter(make_loader(encode(backbone, reworded), 6)))
        cached = backbone.class_logits(batch)
        assert backbone.trunk.computed == 12, "a new template must miss the cache"
        backbone.configure_trunk_cache("off", TOP2)
        full = backbone.class_logits(batch)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_saved_cache_is_reused_by_the_same_model_and_ignored_by_another(tmp_path):
    path = tmp_path / "trunk.pt"
    a = four_layer_backbone("llama", seed=0)
    trunk = a.configure_trunk_cache("auto", TOP2)
    batch = next(iter(make_loader(encode(a, toy_examples(6, 6)), 6)))
    with torch.no_grad():
        expected = a.class_logits(batch)
    trunk.save(path)

    again = four_layer_backbone("llama", seed=0)
    reloaded = again.configure_trunk_cache("auto", TOP2)
    assert reloaded.fingerprint == trunk.fingerprint and reloaded.load(path)
    with torch.no_grad():
        torch.testing.assert_close(again.class_logits(batch), expected, atol=1e-6, rtol=1e-6)
    assert reloaded.computed == 0 and reloaded.hits == 6

    other = four_layer_backbone("llama", seed=1)  # same name and shapes, other weights
    stale = other.configure_trunk_cache("auto", TOP2)
    assert stale.fingerprint != trunk.fingerprint and not stale.load(path)
    with torch.no_grad():
        cached = other.class_logits(batch)
        other.configure_trunk_cache("off", TOP2)
        torch.testing.assert_close(cached, other.class_logits(batch), atol=1e-5, rtol=1e-5)
    assert stale.computed == 6


def test_adapter_below_the_cached_layer_is_refused():
    backbone = four_layer_backbone("llama")
    backbone.configure_trunk_cache("auto", TOP2)
    with pytest.raises(ConfigError, match="trunk_cache: off"):
        backbone.add_lora("low", LoraSettings(r=2, layers=[0, 3]))
    assert "low" not in backbone.adapter_names()


def test_all_layers_adapted_or_unsupported_architecture_runs_the_full_forward():
    backbone = four_layer_backbone("llama")
    assert backbone.configure_trunk_cache("auto", LoraSettings(r=2)) is None  # adapters on every layer
    backbone.lm.config.model_type = "gpt_neox"
    assert backbone.configure_trunk_cache("auto", TOP2) is None
    with pytest.raises(ConfigError, match="auto or off"):
        backbone.configure_trunk_cache("on", TOP2)


def test_phase_profile_charges_exclusive_time():
    profile = PhaseProfile()
    with recording(profile):
        with phase("fit"):
            time.sleep(0.02)
            with phase("trunk"):
                time.sleep(0.03)
    with phase("fit"):  # nothing recording: a no-op
        time.sleep(0.01)
    assert 0.02 <= profile.seconds["fit"] < 0.03 + 0.01
    assert 0.03 <= profile.seconds["trunk"] < 0.04 + 0.01


def test_cache_fills_are_charged_to_their_cache_and_left_out_of_own_seconds():
    profile = PhaseProfile()
    with recording(profile), own_seconds() as took:
        time.sleep(0.02)  # the method's own work
        with filling_cache("map_adapter") as charged:
            time.sleep(0.03)
            with filling_cache("trunk"):  # trunk states computed while the MAP adapter trains
                time.sleep(0.04)
    assert 0.03 <= profile.cache_seconds["map_adapter"] < 0.04 + 0.01
    assert charged[0] == pytest.approx(profile.cache_seconds["map_adapter"])
    assert 0.04 <= profile.cache_seconds["trunk"] < 0.05 + 0.01
    assert 0.02 <= took[0] < 0.03 + 0.01
    with own_seconds() as idle, filling_cache("trunk") as unrecorded:  # nothing recording: wall time only
        time.sleep(0.01)
    assert idle[0] >= 0.01 and unrecorded == [None]
