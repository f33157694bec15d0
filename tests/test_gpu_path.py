"""The options of the large-model path, checked on CPU against the plain path: gradient
checkpointing, compiled decoder layers, training peak memory."""

import pytest
import torch

from bayeslora import ConfigError, get_method
from bayeslora.backbone import load_backbone
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader
from benchmarks.runner import checkpointing_for

from .conftest import tiny_model_settings

MAP_CONFIG = {"lora": LoraSettings(r=2, alpha=4, dropout=0.1),
              "train": TrainSettings(epochs=2, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0)}


def test_gradient_checkpointing_trains_the_same_adapter(toy_splits):
    """Checkpointing recomputes each layer's forward inside backward; with LoRA dropout on, the
    recomputation must see the same train mode and dropout masks, so the adapters come out equal."""
    train, val, _ = toy_splits
    adapters, reports = [], []
    for checkpointing in (False, True):
        backbone = load_backbone({**tiny_model_settings("llama"), "gradient_checkpointing": checkpointing})
        post = get_method("map")(MAP_CONFIG, seed=0)
        reports.append(post.fit(backbone, train, val))
        adapters.append(backbone.lora_parameters(post.adapter_name))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(adapters[0][next(k for k in adapters[0] if "lora_B" in k)], torch.tensor(0.0))
    assert all(r.extra["train_peak_mem_mb"] > 0 for r in reports)


@pytest.mark.parametrize("method", ["blob", "lora_curve", "bbb_lora"])
def test_methods_whose_forward_checkpointing_cannot_replay_refuse_it(method, toy_splits):
    train, val, _ = toy_splits
    backbone = load_backbone({**tiny_model_settings("llama"), "gradient_checkpointing": True})
    with pytest.raises(ConfigError, match="gradient_checkpointing_paused"):
        get_method(method)({"train": MAP_CONFIG["train"]}, seed=0).fit(backbone, train, val)
    get_method(method)().attach(backbone)  # attaching to reload and predict needs no backward: allowed


def test_paused_checkpointing_trains_such_a_method_as_without_it(toy_splits):
    """The runner fits BLoB inside gradient_checkpointing_paused(): the same posterior as on a model
    loaded without checkpointing, and checkpointing is back on afterwards."""
    train, val, test = toy_splits
    config = {"train": MAP_CONFIG["train"], "lora": MAP_CONFIG["lora"]}
    logits = []
    for checkpointing in (False, True):
        backbone = load_backbone({**tiny_model_settings("llama"), "gradient_checkpointing": checkpointing})
        post = get_method("blob")(config, seed=0)
        with backbone.gradient_checkpointing_paused():
            post.fit(backbone, train, val)
        assert backbone.gradient_checkpointing_active == checkpointing
        logits.append(post.predict(make_loader(test, 6), 3).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_compiled_decoder_layers_give_the_eager_logits(toy_splits):
    _, _, test = toy_splits
    batch = next(iter(make_loader(test, 6)))
    eager = load_backbone(tiny_model_settings("qwen2"))
    compiled = load_backbone({**tiny_model_settings("qwen2"), "compile": True})
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.lm.get_decoder().layers)
    with torch.inference_mode():
        torch.testing.assert_close(compiled.class_logits(batch), eager.class_logits(batch), atol=1e-4, rtol=1e-4)


def test_the_runner_pauses_checkpointing_only_for_methods_that_need_it():
    backbone = load_backbone({**tiny_model_settings("llama"), "gradient_checkpointing": True})
    for method, paused in (("map", False), ("mc_dropout", False), ("blob", True), ("lora_curve", True)):
        with checkpointing_for(get_method(method)(), backbone):
            assert backbone.gradient_checkpointing_active is not paused
    assert backbone.gradient_checkpointing_active
