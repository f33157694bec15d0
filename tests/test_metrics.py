import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from bayeslora.metrics import (
    aurc,
    auroc,
    classification_metrics,
    expected_calibration_error,
    log_predictive,
    ood_metrics,
    uncertainty,
)


def test_ece_equals_torchmetrics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 1, 4, generator=g) * 3
    labels = torch.randint(0, 4, (500,), generator=g)
    ours = classification_metrics(logits, labels)["ece"]
    ref = MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(logits[:, 0].softmax(-1), labels)
    assert ours == pytest.approx(float(ref), abs=1e-6)


def test_ece_with_confidence_exactly_one_matches_torchmetrics():
    conf = torch.tensor([1.0, 1.0, 0.5, 0.7, 0.95], dtype=torch.float64)
    correct = torch.tensor([True, False, True, False, True])
    probs = torch.stack([conf, 1 - conf], dim=1).float()
    labels = torch.where(correct, 0, 1)
    ref = MulticlassCalibrationError(num_classes=2, n_bins=15, norm="l1")(probs, labels)
    assert expected_calibration_error(conf, correct) == pytest.approx(float(ref), abs=1e-6)


def test_mutual_information_hand_computed():
    # two samples, one confident in class 0, one confident in class 1 -> mean is uniform
    p1, p2 = torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9])
    logits = torch.stack([p1.log(), p2.log()])[None]  # (1, 2, 2)
    h = lambda p: -(p * p.log()).sum()
    expected_entropy = (h(p1) + h(p2)) / 2
    u = uncertainty(logits)
    assert float(u["entropy"][0]) == pytest.approx(math.log(2), abs=1e-9)
    assert float(u["expected_entropy"][0]) == pytest.approx(float(expected_entropy), abs=1e-6)
    assert float(u["mi"][0]) == pytest.approx(math.log(2) - float(expected_entropy), abs=1e-6)


def test_deterministic_has_zero_mi_and_identical_samples_too():
    logits = torch.randn(20, 1, 3)
    assert classification_metrics(logits, torch.zeros(20, dtype=torch.long))["mi"] == 0.0
    repeated = logits.repeat(1, 5, 1)
    assert classification_metrics(repeated, torch.zeros(20, dtype=torch.long))["mi"] == pytest.approx(0.0, abs=1e-12)


def test_mi_bounded_by_log_k():
    logits = torch.randn(100, 8, 5) * 10
    mi = uncertainty(logits)["mi"]
    assert (mi >= 0).all() and (mi <= math.log(5) + 1e-9).all()


def test_log_predictive_is_log_mean_softmax():
    logits = torch.randn(7, 4, 3) * 50  # large logits: naive float32 would underflow
    ref = logits.double().softmax(-1).mean(1).log()
    assert torch.allclose(log_predictive(logits), ref, atol=1e-9)


def test_acc_nll_brier_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]])
    labels = torch.tensor([0, 0, 1])
    m = classification_metrics(probs.log()[:, None], labels)
    assert m["acc"] == pytest.approx(1 / 3)
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.4) + math.log(0.2)) / 3, abs=1e-6)
    brier = ((0.3**2 + 0.3**2) + (0.6**2 + 0.6**2) + (0.8**2 + 0.8**2)) / 3
    assert m["brier"] == pytest.approx(brier, abs=1e-6)


def test_masked_choices_get_zero_probability():
    logits = torch.tensor([[[2.0, 1.0, -1e9]]])
    m = classification_metrics(logits, torch.tensor([0]))
    assert math.isfinite(m["nll"]) and math.isfinite(m["entropy"])
    assert m["nll"] == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + math.exp(1))), abs=1e-6)


def test_labels_out_of_range_raise():
    with pytest.raises(ValueError, match="out of range"):
        classification_metrics(torch.randn(3, 1, 2), torch.tensor([0, 1, 2]))


def test_auroc_hand_computed_with_ties():
    # pos {3, 2}, neg {2, 1}: pairs (3>2)(3>1)(2=2 -> 0.5)(2>1) -> 3.5/4
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([2.0, 1.0])) == pytest.approx(0.875)


def test_ood_auroc_separates():
    sharp = torch.tensor([[[9.0, -9.0], [9.0, -9.0]]]).repeat(10, 1, 1)
    disagree = torch.tensor([[[9.0, -9.0], [-9.0, 9.0]]]).repeat(10, 1, 1)
    out = ood_metrics(sharp, disagree)
    assert out["ood_auroc_mi"] == 1.0 and out["ood_auroc_entropy"] == 1.0


def test_aurc_perfect_ranking_and_reverse():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    # errors on the least confident two: risks 0, 0, 1/3, 2/4
    assert aurc(conf, torch.tensor([True, True, False, False])) == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)
    assert aurc(conf, torch.tensor([False, False, True, True])) > 0.5
