import math

import pytest
import torch

from bayeslora import ConfigError, TrainingError, get_method
from bayeslora.adapters import ClassifierHooks
from bayeslora.artifacts import ArtifactStore
from bayeslora.config import TrainSettings
from bayeslora.data import make_loader
from bayeslora.metrics import classification_metrics
from bayeslora.training import train


def test_map_training_lowers_nll_and_beats_zero_shot(tiny_backbone, toy_splits, fast_adapter_config):
    train_split, val, test = toy_splits
    zero = get_method("zero_shot")()
    zero.fit(tiny_backbone, train_split, val)
    before = classification_metrics(*_lp(zero.predict(make_loader(test, 8), 1)))
    post = get_method("map")(fast_adapter_config, seed=0)
    report = post.fit(tiny_backbone, train_split, val)
    pred = post.predict(make_loader(test, 8), 5)
    after = classification_metrics(pred.logits, pred.labels)
    assert pred.logits.shape == (12, 1, 2) and pred.cost.forward_passes == 1
    assert report.trainable_params == 2 * 2 * (2 * 32 + 32 + 16)  # 2 layers x (q: A 2x32, B 32x2; v: A 2x32, B 16x2)
    assert after["nll"] < before["nll"]


def _lp(pred):
    return pred.logits, pred.labels


def test_saved_and_reloaded_posterior_predicts_the_same(tiny_backbone, toy_splits, fast_adapter_config):
    train_split, val, test = toy_splits
    post = get_method("map")(fast_adapter_config, seed=3)
    post.fit(tiny_backbone, train_split, val)
    first = post.predict(make_loader(test, 8), 1)
    state = post.state_dict()
    post.release()
    fresh = get_method("map")(fast_adapter_config, seed=3).attach(tiny_backbone)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.predict(make_loader(test, 8), 1).logits, first.logits)


def test_map_adapter_is_cached_and_reused(tmp_path, tiny_backbone, toy_splits, fast_adapter_config):
    train_split, val, test = toy_splits
    store = ArtifactStore(tmp_path)
    a = get_method("map")(fast_adapter_config, seed=1, artifacts=store)
    ra = a.fit(tiny_backbone, train_split, val)
    la = a.predict(make_loader(test, 8), 1).logits
    a.release()
    b = get_method("map")(fast_adapter_config, seed=1, artifacts=store)
    rb = b.fit(tiny_backbone, train_split, val)
    assert not ra.reused_cache and rb.reused_cache and store.hits == 1
    assert torch.equal(b.predict(make_loader(test, 8), 1).logits, la)
    b.release()
    c = get_method("map")(fast_adapter_config, seed=2, artifacts=store)  # another seed is another adapter
    assert not c.fit(tiny_backbone, train_split, val).reused_cache


def test_mle_differs_from_map_only_by_weight_decay(fast_adapter_config):
    assert get_method("mle")(fast_adapter_config).map.train_settings().weight_decay == 0.0
    assert get_method("map")(fast_adapter_config).map.train_settings().weight_decay == fast_adapter_config[
        "train"].weight_decay


def test_nan_loss_is_a_clear_error(tiny_backbone, toy_splits):
    tiny_backbone.add_lora("nan", __import__("bayeslora.config", fromlist=["LoraSettings"]).LoraSettings(r=2))

    class NanHooks(ClassifierHooks):
        def loss(self, batch, step):
            return super().loss(batch, step) * float("nan")

    hooks = NanHooks(tiny_backbone, tiny_backbone.lora_parameters("nan"))
    with pytest.raises(TrainingError, match="lower train.lr"):
        train(hooks, make_loader(toy_splits[0], 8), TrainSettings(progress=False), tiny_backbone.device)


def test_early_stopping_restores_best_epoch(tiny_backbone, toy_splits):
    from bayeslora.config import LoraSettings

    tiny_backbone.add_lora("es", LoraSettings(r=2, dropout=0.0), seed=0)
    hooks = ClassifierHooks(tiny_backbone, tiny_backbone.lora_parameters("es"))
    settings = TrainSettings(epochs=4, lr=5e-2, batch_size=8, progress=False, early_stopping_patience=0)
    result = train(hooks, make_loader(toy_splits[0], 8), settings, tiny_backbone.device,
                   make_loader(toy_splits[1], 8))
    vals = [h["val_nll"] for h in result.history]
    assert result.best_val_nll == pytest.approx(min(vals))
    assert hooks.val_nll(make_loader(toy_splits[1], 8)) == pytest.approx(min(vals), rel=1e-5)
    assert all(math.isfinite(v) for v in vals)


@pytest.mark.parametrize("keep, expected_epoch", [("best_val", 2), ("last", 4)])
def test_keep_chooses_the_best_validation_epoch_or_the_last(keep, expected_epoch):
    from bayeslora.training import TrainingHooks

    class Scripted(TrainingHooks):
        """w grows by one step per epoch; validation NLL is scripted to be lowest after epoch 2."""

        def __init__(self):
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.epochs_done, self.w_at = 0, {}

        def param_groups(self):
            return [{"params": [self.w]}]

        def loss(self, batch, step):
            return -self.w  # AdamW's first steps move w by ~lr each

        def val_nll(self, loader):
            self.epochs_done += 1
            self.w_at[self.epochs_done] = float(self.w)
            return [0.5, 0.3, 0.4, 0.6][self.epochs_done - 1]

        def snapshot(self):
            return {"w": self.w.detach().clone()}

        def restore(self, state):
            with torch.no_grad():
                self.w.copy_(state["w"])

    hooks = Scripted()
    settings = TrainSettings(epochs=4, lr=0.1, batch_size=1, weight_decay=0.0, warmup_ratio=0.0,
                             schedule="constant", progress=False, keep=keep)
    result = train(hooks, [{}] * 2, settings, torch.device("cpu"), val_loader=[{}])
    assert len(result.history) == 4 and result.best_val_nll == 0.3
    assert len(set(hooks.w_at.values())) == 4
    assert float(hooks.w) == hooks.w_at[expected_epoch]
    with pytest.raises(ConfigError, match="train.keep"):
        train(hooks, [{}], TrainSettings(keep="best", progress=False), torch.device("cpu"))


def test_groups_marked_clip_false_are_left_out_of_gradient_clipping():
    from bayeslora.training import TrainingHooks

    class TwoGroups(TrainingHooks):
        def __init__(self):
            self.big, self.small = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(3))
            self.grads: list[tuple[float, float]] = []

        def param_groups(self):
            return [{"params": [self.small]}, {"params": [self.big], "clip": False}]

        def loss(self, batch, step):
            return 1000.0 * self.big + 5.0 * self.small.sum()

        def on_step_end(self, step, epoch):
            self.grads.append((float(self.big.grad), float(self.small.grad.norm())))

    hooks = TwoGroups()
    train(hooks, [{}] * 2, TrainSettings(epochs=1, batch_size=1, progress=False, max_grad_norm=1.0),
          torch.device("cpu"))
    big, small = hooks.grads[0]
    assert big == pytest.approx(1000.0)  # untouched
    assert small == pytest.approx(1.0, rel=1e-4)  # clipped alone: 5 sqrt(3) -> 1


def test_release_removes_exactly_the_adapters_a_posterior_owns(tiny_backbone, toy_splits, fast_adapter_config):
    from bayeslora.config import LoraSettings

    tiny_backbone.add_lora("someone-else", LoraSettings(r=2, dropout=0.0))
    ensemble = get_method("ensemble")({**fast_adapter_config, "members": 2}, seed=1)
    ensemble.fit(tiny_backbone, *toy_splits[:2])
    assert sorted(tiny_backbone.adapter_names()) == ["ensemble-seed1-member2", "ensemble-seed1-member3",
                                                      "someone-else"]
    ensemble.release()
    assert tiny_backbone.adapter_names() == ["someone-else"]
    again = get_method("ensemble")({**fast_adapter_config, "members": 2}, seed=1)  # the same names are free again
    again.fit(tiny_backbone, *toy_splits[:2])
    again.release()


def test_no_method_writes_its_own_release():
    from pathlib import Path

    root = Path(__file__).parents[1]
    sources = [p for folder in ("baselines", "bayeslora") for p in (root / folder).rglob("*.py")]
    overriding = [p.name for p in sources if "def release(" in p.read_text() and p.name != "posterior.py"]
    assert overriding == []
