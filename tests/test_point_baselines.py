"""The seeds' non-Bayesian baselines: LoRA-XS and PoLAR by MAP, and LoRA + VBLL, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from bayeslora import get_method
from bayeslora.artifacts import ArtifactStore
from bayeslora.backbone import target_modules
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import make_loader

LORA = LoraSettings(r=2, alpha=4, dropout=0.0)


def _config(**extra):
    return {"lora": LORA, "train": TrainSettings(epochs=3, lr=2e-2, batch_size=8, progress=False, warmup_ratio=0.0),
            **extra}


def _val_nll(post, loader) -> float:
    pred = post.predict(loader, 1)
    return float(torch.nn.functional.cross_entropy(pred.logits.mean(1), pred.labels))


@pytest.mark.parametrize("name", ["lora_xs", "polar"])
def test_point_adapters_train_by_map_predict_once_and_reload(name, tiny_backbone, toy_splits, tmp_path):
    train, val, test = toy_splits
    cls = get_method(name)
    post = cls(_config(), seed=0, artifacts=ArtifactStore(tmp_path))
    post.attach(tiny_backbone)
    post._build(tiny_backbone)  # the seeded initialisation fit starts from
    loader = make_loader(test, 4)
    before = _val_nll(post, make_loader(train, 8))
    report = post.fit(tiny_backbone, train, val)
    assert _val_nll(post, make_loader(train, 8)) < before  # MAP training lowered the training loss
    n_modules = len(target_modules(tiny_backbone, LORA))
    if name == "lora_xs":
        assert report.trainable_params == n_modules * LORA.r ** 2
    else:
        assert report.extra["orthogonality_error"] < 0.1
    pred = post.predict(loader, 10)
    assert pred.logits.shape == (len(test), 1, 2) and report.posterior_params == 0
    again = cls(post.config, seed=0, artifacts=ArtifactStore(tmp_path)).attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    torch.testing.assert_close(again.predict(loader, 10).logits, pred.logits)


def test_lora_vbll_trains_a_plain_lora_with_the_head_and_samples_from_it(tiny_backbone, toy_splits):
    train, val, test = toy_splits
    post = get_method("lora_vbll")(_config(), seed=0)
    assert post.config.schedule == "joint"
    report = post.fit(tiny_backbone, train, val)
    assert "orthogonality_error" not in report.extra
    assert any(float(b.abs().sum()) > 0 for b in post.adapter.B.values())  # the LoRA moved off B = 0
    loader = make_loader(test, 4)
    pred = post.predict(loader, 5)
    assert pred.logits.shape == (len(test), 5, 2) and pred.cost.forward_passes == 1
    assert pred.logits.std(1).mean() > 0
    again = get_method("lora_vbll")(post.config, seed=0).attach(tiny_backbone)
    again.load_state_dict(post.state_dict())
    torch.testing.assert_close(again.predict(loader, 5).logits, pred.logits)
