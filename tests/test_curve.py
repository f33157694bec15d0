"""LoRA-Curve: Bezier algebra, the curve objective, prediction against MAP anchors, paths and barriers."""

import math

import pandas as pd
import pytest
import torch

from baselines.map_lora import MapLora
from bayeslora import ConfigError
from bayeslora.artifacts import ArtifactStore
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.curve import BezierCurve, bernstein, curve_coefficients, interpolate, num_control_points
from bayeslora.data import make_loader
from bayeslora.lora_curve import CurveHooks, LoraCurve, jensen_shannon, perturb
from bayeslora.metrics import uncertainty
from bayeslora.paths import PATH_COLUMNS, PathSettings, barrier_columns, barrier_table, diversity_along, evaluate_paths

from .conftest import perturb_adapter

SHAPES = {"a": (3, 4), "b": (5,)}


def random_points(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(count)]


def random_curve(anchors: int, degree: int, seed: int = 0) -> BezierCurve:
    points = random_points(num_control_points(anchors, degree), seed)
    return BezierCurve(points, anchors, degree, [True] * len(points))


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
def test_bernstein_coefficients_sum_to_one_and_are_nonnegative(degree):
    for tau in torch.linspace(0, 1, 101).tolist():
        b = bernstein(degree, tau)
        assert len(b) == degree + 1 and min(b) >= 0 and math.isclose(sum(b), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize(("anchors", "degree"), [(2, 1), (2, 2), (3, 2), (4, 3)])
def test_curve_coefficients_sum_to_one_for_every_t(anchors, degree):
    for t in torch.linspace(0, 1, 997, dtype=torch.float64).tolist():
        c = curve_coefficients(t, anchors, degree)
        assert math.isclose(sum(c.values()), 1.0, abs_tol=1e-12)
        assert len(c) == degree + 1 and max(c) < num_control_points(anchors, degree)


@pytest.mark.parametrize(("anchors", "degree"), [(2, 2), (3, 2), (4, 3)])
def test_curve_passes_exactly_through_every_anchor(anchors, degree):
    curve = random_curve(anchors, degree)
    for i in range(anchors):
        point, anchor = curve.point(i / (anchors - 1)), curve.anchor(i)
        assert all(torch.equal(point[k], anchor[k]) for k in SHAPES)
    assert all(torch.equal(curve.anchor(i)[k], curve.control_point(i * degree)[k]) for i in range(anchors)
               for k in SHAPES)


def test_curve_is_continuous_across_segment_joins():
    curve = random_curve(anchors=4, degree=3)
    for join in (1 / 3, 2 / 3):
        left, right = curve.point(join - 1e-9), curve.point(join + 1e-9)
        at = curve.point(join)
        for k in SHAPES:
            torch.testing.assert_close(left[k], at[k], atol=1e-6, rtol=0)
            torch.testing.assert_close(right[k], at[k], atol=1e-6, rtol=0)
    # the Bezier formula of the left segment at tau = 1 is the shared anchor
    left_end = sum(c * p for c, p in zip(bernstein(3, 1.0), [curve.control_point(i)["a"] for i in range(4)],
                                         strict=True))
    torch.testing.assert_close(left_end, curve.point(1 / 3)["a"])


def test_bezier_matches_the_hand_written_quadratic():
    curve = random_curve(anchors=2, degree=2)
    w0, w1, w2 = (curve.control_point(i)["a"] for i in range(3))
    for t in (0.1, 0.5, 0.77):
        expected = (1 - t) ** 2 * w0 + 2 * t * (1 - t) * w1 + t**2 * w2
        torch.testing.assert_close(curve.point(t)["a"], expected)


def test_straight_line_initialisation_is_the_piecewise_linear_path():
    anchors = random_points(3, seed=4)
    curve = BezierCurve.through_anchors(anchors, degree=3)
    assert curve.trainable == [False, True, True, False, True, True, False]
    for t in (0.0, 0.2, 0.5, 0.61, 1.0):
        j = min(int(t * 2), 1)
        expected = interpolate(anchors[j], anchors[j + 1], t * 2 - j)
        for k in SHAPES:
            torch.testing.assert_close(curve.point(t)[k], expected[k])
    trainable = curve.trainable_parameters()
    assert len(trainable) == 4 * len(SHAPES)  # interior points only; anchors are buffers


def test_t_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        random_curve(3, 2).point(1.2)


def test_jensen_shannon_equals_the_mutual_information_of_the_samples():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(4, 7, 3, generator=g)  # (m, B, K)
    expected = uncertainty(logits.transpose(0, 1)).get("mi").mean()
    torch.testing.assert_close(jensen_shannon(logits).double(), expected, atol=1e-6, rtol=1e-6)
    assert jensen_shannon(logits[:1].expand(4, -1, -1)).abs() < 1e-6  # identical points: no divergence


def test_jensen_shannon_on_a_hand_computed_pair():
    # p1 = (1, 0), p2 = (0, 1): mean (1/2, 1/2), JSD = log 2 - 0
    logits = torch.tensor([[[0.0, -1e9]], [[-1e9, 0.0]]])
    torch.testing.assert_close(jensen_shannon(logits), torch.tensor(math.log(2)))


@pytest.mark.parametrize("scale", ["absolute", "weight_norm"])
def test_perturbation_has_the_configured_standard_deviation(scale):
    w = {"w": 3.0 * torch.ones(400, 500)}
    noisy = perturb(w, 0.01, scale, torch.Generator().manual_seed(0))
    std = (noisy["w"] - w["w"]).std().item()
    expected = 0.01 if scale == "absolute" else 0.01 * 3.0
    assert abs(std / expected - 1) < 0.01


def test_class_logits_with_equals_loading_the_weights_and_is_differentiable(tiny_backbone, toy_splits):
    backbone = tiny_backbone
    backbone.add_lora("x", LoraSettings(r=2, alpha=4, dropout=0.0), seed=0)
    perturb_adapter(backbone, "x")
    batch = next(iter(make_loader(toy_splits[2], 6)))
    weights = {k: (v + 0.1).requires_grad_() for k, v in backbone.adapter_state("x").items()}
    substituted = backbone.class_logits_with("x", weights, batch)
    before = backbone.class_logits(batch)
    backbone.load_adapter_state("x", {k: v.detach() for k, v in weights.items()})
    torch.testing.assert_close(substituted, backbone.class_logits(batch))
    assert not torch.allclose(before, substituted)  # nothing was written into the model by the substitution
    substituted[:, 0].sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)


def curve_config(**changes):
    return {"lora": LoraSettings(r=2, alpha=4, dropout=0.0),
            "train": TrainSettings(epochs=2, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0), **changes}


def test_anchored_curve_predicts_the_map_anchors_at_their_grid_points(tiny_backbone, toy_splits, tmp_path):
    train, val, test = toy_splits
    store = ArtifactStore(tmp_path)
    curve = LoraCurve(curve_config(), seed=0, artifacts=store)
    report = curve.fit(tiny_backbone, train, val)
    assert report.extra["control_points"] == 5 and report.trainable_params == 2 * report.posterior_params // 4
    loader = make_loader(test, 5)
    pred = curve.predict(loader, 3)  # grid t = 0, 0.5, 1: the three anchors
    assert pred.logits.shape == (12, 3, 2) and pred.cost.forward_passes == 3
    for s, map_seed in enumerate(curve.anchor_seeds()):
        map_post = MapLora(curve_config(), seed=map_seed, artifacts=store)
        assert map_post.fit(tiny_backbone, train, val).reused_cache  # the anchors are the cached MAP adapters
        torch.testing.assert_close(pred.logits[:, s], map_post.predict(loader, 1).logits[:, 0], atol=1e-5, rtol=1e-5)
        map_post.release()
    between = curve.predict(loader, 5).logits[:, 1]  # t = 0.25: a trained interior point, not an anchor
    assert not torch.allclose(between, pred.logits[:, 0], atol=1e-4)


def test_training_moves_only_the_interior_points_and_lowers_the_loss(tiny_backbone, toy_splits):
    train, val, _ = toy_splits
    post = LoraCurve(curve_config(), seed=0)
    post.config.check()
    post.attach(tiny_backbone)
    anchors, _, _ = post._map_anchors(tiny_backbone, train, val)
    start = BezierCurve.through_anchors(anchors, 2)
    before = start.values()
    post.fit(tiny_backbone, train, val)
    after = post.curve.values()
    for i in (0, 2, 4):
        assert all(torch.equal(before[i][k], after[i][k].cpu()) for k in before[i])
    for i in (1, 3):
        assert any(not torch.allclose(before[i][k], after[i][k].cpu()) for k in before[i])
    hooks = CurveHooks(tiny_backbone, post.adapter_name, start, post.config, seed=0)
    trained = CurveHooks(tiny_backbone, post.adapter_name, post.curve, post.config, seed=0)
    loader = make_loader(train, 16)
    assert trained.val_nll(loader) < hooks.val_nll(loader)


def test_js_regulariser_raises_the_mutual_information(tiny_backbone, toy_splits):
    train, val, test = toy_splits
    mi = {}
    train_settings = TrainSettings(epochs=6, lr=3e-2, batch_size=8, progress=False, warmup_ratio=0.0)
    for weight in (0.0, 5.0):
        post = LoraCurve(curve_config(js_weight=weight, t_per_step=3, mode="free", train=train_settings), seed=0)
        post.fit(tiny_backbone, train, val)
        mi[weight] = uncertainty(post.predict(make_loader(test, 6), 5).logits)["mi"].mean().item()
        post.release()
    assert mi[5.0] > 2 * mi[0.0]


def test_free_curve_trains_every_control_point(tiny_backbone, toy_splits):
    train, val, test = toy_splits
    post = LoraCurve(curve_config(mode="free", t_sampling="stratified", perturbation=0.01), seed=1)
    post.attach(tiny_backbone)
    initial = [post._initial_point(tiny_backbone, k, num_classes=2) for k in range(5)]
    report = post.fit(tiny_backbone, train, val)
    assert report.trainable_params == 5 * sum(v.numel() for v in initial[0].values())
    after = post.curve.values()
    assert all(any(not torch.allclose(initial[i][k], after[i][k].cpu()) for k in initial[i]) for i in range(5))
    assert post.predict(make_loader(test, 6), 4).logits.shape == (12, 4, 2)


def test_saved_and_reloaded_curve_predicts_the_same(tiny_backbone, toy_splits):
    train, val, test = toy_splits
    post = LoraCurve(curve_config(predict_points="sampled", perturbation=0.05, predict_perturbation=True), seed=0)
    post.fit(tiny_backbone, train, val)
    loader = make_loader(test, 5)
    expected = post.predict(loader, 4).logits
    state = post.state_dict()
    post.release()
    again = LoraCurve(curve_config(predict_points="sampled", perturbation=0.05, predict_perturbation=True), seed=0)
    again.attach(tiny_backbone)
    again.load_state_dict(state)
    torch.testing.assert_close(again.predict(loader, 4).logits, expected, atol=0, rtol=0)


def test_loss_along_the_curve_is_lipschitz_in_t(tiny_backbone, toy_splits):
    train, val, _ = toy_splits
    post = LoraCurve(curve_config(), seed=0)
    post.fit(tiny_backbone, train, val)
    table = evaluate_paths(tiny_backbone, {"curve": post.paths()["curve_0-1"]}, {"train": train},
                           PathSettings(points=101))
    loss = torch.tensor(table.sort_values("t")["loss"].to_numpy())
    fine, coarse = loss.diff().abs().max(), loss[::2].diff().abs().max()
    assert fine < 0.02  # neighbouring t (1/100 apart) give close losses
    assert fine < 0.75 * coarse  # and halving the step roughly halves the largest change


def test_paths_start_at_the_map_anchor_and_compare_each_segment_with_its_own_line(tiny_backbone, toy_splits,
                                                                                  tmp_path):
    train, val, test = toy_splits
    store = ArtifactStore(tmp_path)
    post = LoraCurve(curve_config(), seed=0, artifacts=store)
    post.fit(tiny_backbone, train, val)
    paths = post.paths()
    assert list(paths) == ["curve_0-1", "curve_1-2", "line_0-1", "line_0-2", "line_1-2"]
    table = evaluate_paths(tiny_backbone, paths, {"test": test}, PathSettings(points=3))
    assert list(table.columns) == PATH_COLUMNS and len(table) == 15
    map_post = MapLora(curve_config(), seed=0, artifacts=store)
    map_post.fit(tiny_backbone, train, val)
    logits = map_post.predict(make_loader(test, 5), 1).logits[:, 0]
    nll = torch.nn.functional.cross_entropy(logits.double(), test.labels).item()
    for path in ("curve_0-1", "line_0-1", "line_0-2"):  # every path from anchor 0 starts at MAP seed 0
        start = table[(table.path == path) & (table.t == 0.0)].iloc[0]
        assert start.loss == pytest.approx(nll, abs=1e-5)
        assert start.acc == pytest.approx((logits.argmax(-1) == test.labels).double().mean().item())
        assert start.disagree_start == 0 and start.js_start == pytest.approx(0, abs=1e-12)
    ends = table[table.t == 1.0].set_index("path")  # segment j ends where line j-(j+1) ends: anchor j + 1
    assert ends.loc["curve_0-1", "loss"] == pytest.approx(ends.loc["line_0-1", "loss"], abs=1e-6)
    assert ends.loc["curve_1-2", "loss"] == pytest.approx(ends.loc["line_0-2", "loss"], abs=1e-6)


def test_a_segment_with_straight_control_points_has_the_straight_lines_losses(tiny_backbone, toy_splits):
    train, _, test = toy_splits
    post = LoraCurve(curve_config(), seed=0)
    post.attach(tiny_backbone)
    tiny_backbone.ensure_adapter(post.adapter_name, post.config.lora, seed=0)
    base = tiny_backbone.adapter_state(post.adapter_name)
    anchors = []
    for seed in range(3):  # three different adapters, B nonzero so that the anchors differ in function
        g = torch.Generator().manual_seed(seed)
        anchors.append({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    post.curve = BezierCurve.through_anchors(anchors, degree=2)  # interior points on the straight lines
    table = evaluate_paths(tiny_backbone, post.paths(), {"test": test}, PathSettings(points=5))
    by_path = {p: part.sort_values("t").reset_index(drop=True) for p, part in table.groupby("path")}
    for j in (0, 1):
        curve, line = by_path[f"curve_{j}-{j + 1}"], by_path[f"line_{j}-{j + 1}"]
        pd.testing.assert_series_equal(curve["loss"], line["loss"], atol=1e-6, rtol=0)  # float32 weights
        pd.testing.assert_series_equal(curve["js_start"], line["js_start"], atol=1e-6, rtol=0)
    assert by_path["line_0-2"]["js_start"].iloc[-1] > 0  # different anchors, different functions
    rows = barrier_table(table).set_index("path")
    assert rows.loc["curve_0-1", "barrier"] == pytest.approx(rows.loc["line_0-1", "barrier"], abs=1e-6)
    post.release()


def test_functional_diversity_along_a_path_by_hand():
    p0 = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    p1 = torch.tensor([[0.5, 0.5], [0.6, 0.4]], dtype=torch.float64)
    p2 = torch.tensor([[0.1, 0.9], [0.7, 0.3]], dtype=torch.float64)

    def h(p):
        return -sum(x * math.log(x) for x in p)

    def js(p, q):
        return h([(a + b) / 2 for a, b in zip(p, q, strict=True)]) - (h(p) + h(q)) / 2

    rows = diversity_along([p0, p1, p2])
    assert rows[0]["disagree_start"] == 0 and rows[2]["disagree_start"] == 1.0  # both examples flip
    assert rows[1]["disagree_start"] == 0.5 and rows[1]["disagree_end"] == 0.5  # argmax of [.5, .5] is class 0
    assert rows[2]["js_start"] == pytest.approx((js([.1, .9], [.9, .1]) + js([.7, .3], [.2, .8])) / 2)
    assert rows[0]["js_end"] == rows[2]["js_start"]
    # MI of {p0, p1} at the first point, of {p0, p1, p2} in the middle
    mid = [(0.9 + 0.5 + 0.1) / 3, (0.1 + 0.5 + 0.9) / 3]
    mi_example0 = h(mid) - (h([.9, .1]) + h([.5, .5]) + h([.1, .9])) / 3
    mid1 = [(0.2 + 0.6 + 0.7) / 3, (0.8 + 0.4 + 0.3) / 3]
    mi_example1 = h(mid1) - (h([.2, .8]) + h([.6, .4]) + h([.7, .3])) / 3
    assert rows[1]["mi_local"] == pytest.approx((mi_example0 + mi_example1) / 2)
    first = [(0.9 + 0.5) / 2, (0.1 + 0.5) / 2]
    first1 = [(0.2 + 0.6) / 2, (0.8 + 0.4) / 2]
    expected = ((h(first) - (h([.9, .1]) + h([.5, .5])) / 2) + (h(first1) - (h([.2, .8]) + h([.6, .4])) / 2)) / 2
    assert rows[0]["mi_local"] == pytest.approx(expected)


def test_barrier_heights_by_hand():
    table = pd.DataFrame({"path": ["p"] * 5, "split": ["test"] * 5, "t": [0, 0.25, 0.5, 0.75, 1.0],
                          "loss": [1.0, 1.5, 2.0, 1.4, 0.6], "acc": [0.8, 0.7, 0.5, 0.6, 0.9]})
    row = barrier_table(table).iloc[0]
    assert row.barrier == pytest.approx(1.0)  # 2.0 - max(1.0, 0.6)
    assert row.barrier_interp == pytest.approx(2.0 - 0.8)  # at t = 0.5 the chord is 0.8
    assert row.acc_min == 0.5
    flat = table.assign(loss=[1.0, 0.9, 0.8, 0.7, 0.6])
    assert barrier_table(flat).iloc[0].barrier == pytest.approx(0.0)
    assert barrier_columns(table) == {"barrier_p_test": pytest.approx(1.0)}


@pytest.mark.parametrize(("changes", "match"), [
    ({"mode": "anchor"}, "mode"),
    ({"js_weight": 0.1, "t_per_step": 1}, "t_per_step"),
    ({"anchors": 1}, "anchors"),
    ({"perturbation_scale": "layer"}, "perturbation_scale"),
    ({"perturbation": -1.0}, "perturbation"),
])
def test_bad_settings_are_clear_errors(changes, match):
    with pytest.raises(ConfigError, match=match):  # when the config is built, before any fit
        LoraCurve(curve_config(**changes))


def test_path_settings_are_checked():
    with pytest.raises(ConfigError, match="points"):
        PathSettings(points=1).check()
    with pytest.raises(ConfigError, match="splits"):
        PathSettings(splits=["dev"]).check()
