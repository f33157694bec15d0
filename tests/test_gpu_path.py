"""The options of the large-model path, checked on CPU against the plain path: gradient
checkpointing, compiled decoder layers, training peak memory."""

import pytest
import torch
from torch.utils.data import DataLoader

from bayeslora import ConfigError, get_method
from bayeslora.backbone import load_backbone
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader
from bayeslora.training import TrainingHooks, train
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


class _RecordingHooks(TrainingHooks):
    """A one-parameter objective that records whether SDPA may pick cuDNN, in the forward and in backward."""

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.weight.register_hook(self._in_backward)
        self.seen: list[tuple[str, bool]] = []

    def _in_backward(self, grad):
        self.seen.append(("backward", torch.backends.cuda.cudnn_sdp_enabled()))
        return grad

    def param_groups(self):
        return [{"params": [self.weight]}]

    def loss(self, batch, step):
        self.seen.append(("forward", torch.backends.cuda.cudnn_sdp_enabled()))
        return (self.weight * batch["x"]).pow(2).mean()


def test_training_steps_run_without_the_cudnn_attention_kernel():
    """cuDNN's SDPA backward returns NaN gradients on left-padded batches of some lengths (bayeslora.attention):
    the loop keeps it out of every step's forward and backward, and restores the setting afterwards."""
    hooks = _RecordingHooks()
    loader = DataLoader([{"x": torch.randn(3)} for _ in range(4)], batch_size=2)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    train(hooks, loader, TrainSettings(epochs=1, lr=1e-2, batch_size=2, progress=False), torch.device("cpu"))
    assert {phase for phase, _ in hooks.seen} == {"forward", "backward"} and len(hooks.seen) == 4
    assert not any(enabled for _, enabled in hooks.seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_laplace_lora_on_a_checkpointed_backbone_predicts_as_without_checkpointing(toy_splits, monkeypatch):
    """transformers and peft hook a checkpointed model's embeddings to call requires_grad_, which
    torch.func (laplace-torch's GLM Jacobians, also in the validation grid search) refuses; the
    backbone drops that hook, and the Jacobians run without the cuDNN attention kernel."""
    import baselines.laplace_common as laplace_common

    train_split, val, test = toy_splits
    config = {**MAP_CONFIG, "lora": LoraSettings(r=2, alpha=4, dropout=0.0, layers=[1]), "prior_method": "gridsearch"}
    cudnn_in_jacobians = []
    original = laplace_common.glm_logit_samples

    def recording(*args, **kwargs):
        cudnn_in_jacobians.append(torch.backends.cuda.cudnn_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(laplace_common, "glm_logit_samples", recording)
    logits = []
    for checkpointing in (False, True):
        backbone = load_backbone({**tiny_model_settings("llama"), "gradient_checkpointing": checkpointing})
        post = get_method("laplace_lora")(config, seed=0)
        post.fit(backbone, train_split, val)
        assert backbone.gradient_checkpointing_active == checkpointing
        logits.append(post.predict(make_loader(test, 4), 4).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    assert cudnn_in_jacobians and not any(cudnn_in_jacobians)


def test_fit_peak_memory_spans_the_windows_that_code_inside_starts(monkeypatch):
    """The runner's fit peak covers every training run and post-hoc pass, although the training loop
    and the predictive each reset the accelerator's peak counter: checked against a scripted allocator."""
    from bayeslora import profiling

    counter = {"peak": 0}
    allocate = lambda n: counter.update(peak=max(counter["peak"], n))  # noqa: E731
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counter.update(peak=0))
    cuda = torch.device("cuda")
    with profiling.peak_memory_window(cuda) as fit:
        allocate(700)                      # e.g. a first ensemble member's training
        profiling.reset_peak_memory(cuda)  # the next training run starts its own window
        allocate(300)
        with profiling.peak_memory_window(cuda) as inner:
            allocate(500)
        allocate(200)
    assert inner.mb == 500 / 2**20 and fit.mb == 700 / 2**20
    with profiling.peak_memory_window(cuda) as later:
        profiling.reset_peak_memory(cuda)
        allocate(900)                      # the peak after the last reset inside
    assert later.mb == 900 / 2**20 and profiling._open_windows == []
