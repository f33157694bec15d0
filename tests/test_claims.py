"""The claims table: its statistics against the metrics they resample, and its verdicts on synthetic
folders where a claim holds, one does not, one is not tested and one has too few runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from bayeslora import Predictive
from bayeslora.metrics import auroc, classification_metrics, expected_calibration_error, ood_metrics, uncertainty
from benchmarks.analysis import RunPredictive, by_run
from benchmarks.claims import (
    CLAIMS,
    FAILS,
    HOLDS,
    NOT_TESTED,
    TOO_FEW,
    Barriers,
    Claim,
    Comparison,
    Ratio,
    bootstrap_weights,
    evaluate_claims,
    per_example,
    weighted_auroc,
    weighted_ece,
)
from benchmarks.report import build_report

from .test_report import rid


def predictive(labels: torch.Tensor, confidence: float, wrong: float, samples: int, seed: int,
               spread: float = 0.0, prefix: str = "sst2") -> Predictive:
    """Binary logits whose top label is right on all but the first ``wrong`` share of the examples,
    at top-label probability ``confidence`` (plus per-sample noise of scale ``spread``)."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    top = labels.clone()
    top[: int(wrong * n)] = 1 - top[: int(wrong * n)]
    margin = torch.logit(torch.tensor(confidence)).item()
    logits = torch.zeros(n, samples, 2)
    logits[torch.arange(n), :, top] = margin
    logits += spread * torch.randn(n, samples, 2, generator=g)
    return Predictive(logits, labels, [f"{prefix}-{i}" for i in range(n)])


def write(out: Path, method: str, seed: int, pred: Predictive, ood: Predictive | None = None, **extra) -> None:
    run_id = rid(f"{method}-{seed}")
    run = out / "runs" / run_id
    run.mkdir(parents=True)
    pred.save(run / "predictive.pt")
    base = {"model": "tiny", "method": method, "method_name": method.split("-")[0], "dataset": "sst2",
            "split": "test", "seed": seed, "num_samples": pred.num_samples, "n_examples": len(pred.labels),
            "suite": "synthetic", "run_id": run_id, "n_bins": 15, "protocol": "offline", **extra}
    rows = [{**base, "eval_set": "sst2", **classification_metrics(pred.logits, pred.labels)}]
    if ood is not None:
        ood.save(run / "predictive-sst2_as_boolq.pt")
        rows.append({**base, "eval_set": "sst2_as_boolq", **classification_metrics(ood.logits, ood.labels),
                     **ood_metrics(pred.logits, ood.logits)})
    (run / "metrics.json").write_text(json.dumps({"run_id": run_id, "rows": rows}))


def labels_for(n: int = 200) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0))


# -- the statistics against the metrics they resample -----------------------------------------------------
def test_unit_weights_reproduce_the_metrics():
    labels = labels_for(120)
    logits = predictive(labels, 0.9, 0.2, samples=4, seed=1, spread=1.0).logits
    ones = torch.ones(1, 120, dtype=torch.float64)
    reference = classification_metrics(logits, labels)
    for metric in ("acc", "nll", "brier", "mi", "entropy"):
        assert float(per_example(logits, labels, metric).mean()) == pytest.approx(reference[metric], abs=1e-9)
    p = torch.softmax(logits.double(), -1).mean(1)
    conf, pred = p.max(-1)
    assert float(weighted_ece(logits, labels, ones)[0]) == pytest.approx(
        expected_calibration_error(conf, pred == labels), abs=1e-9)
    ood = predictive(labels_for(80), 0.6, 0.5, samples=4, seed=2, spread=2.0).logits
    u_id, u_ood = uncertainty(logits)["mi"], uncertainty(ood)["mi"]
    assert float(weighted_auroc(u_ood, u_id, torch.ones(1, 80, dtype=torch.float64), ones)[0]) == pytest.approx(
        auroc(u_ood, u_id), abs=1e-12)


def test_bootstrap_weights_are_resamples_with_replacement():
    w = bootstrap_weights(50, resamples=300)
    assert w.shape == (300, 50) and torch.all(w.sum(1) == 50) and torch.all(w >= 0)
    assert torch.equal(w, bootstrap_weights(50, resamples=300))  # seeded: the report is reproducible
    assert 0.3 < float((w == 0).double().mean()) < 0.45  # P(an example is left out) -> 1/e


# -- verdicts ---------------------------------------------------------------------------------------------
def claim_data(runs: dict[tuple[str, int], Predictive], **columns) -> SimpleNamespace:
    rows, preds = [], []
    for (method, seed), pred in runs.items():
        rows.append({"model": "tiny", "dataset": "sst2", "eval_set": "sst2", "method": method, "seed": seed,
                     **classification_metrics(pred.logits, pred.labels),
                     **{c: v[method] for c, v in columns.items() if method in v}})
        preds.append(RunPredictive("tiny", method, seed, "sst2", "sst2", pred))
    return SimpleNamespace(results=pd.DataFrame(rows), index=by_run(preds))


def test_a_calibration_claim_holds_where_the_method_is_better_calibrated_and_fails_where_it_is_not():
    labels = labels_for()
    runs = {}
    for seed in (0, 1, 2):  # 80% accurate everywhere; MAP at 0.99 confidence, Laplace at 0.77, BLoB at 0.999
        runs["map", seed] = predictive(labels, 0.99, 0.2, 1, seed)
        runs["laplace_lora", seed] = predictive(labels, 0.77, 0.2, 4, seed, spread=0.02)
        runs["blob", seed] = predictive(labels, 0.999, 0.2, 4, seed, spread=0.05)
    data = claim_data(runs)
    laplace, blob = (c for c in CLAIMS if c.name.startswith(("Laplace-LoRA", "BLoB")))
    (held,), (failed,) = evaluate_claims(data, [laplace]), evaluate_claims(data, [blob])
    assert held.verdict == HOLDS and failed.verdict == FAILS
    ece = held.outcomes[0]
    # ECE by hand: MAP |0.8 - 0.99| = 0.19, Laplace |0.8 - 0.77| = 0.03 (one bin each)
    assert ece.effect == pytest.approx(0.03 - 0.19, abs=0.005) and ece.n_seeds == 3 and ece.n_examples == 200
    assert ece.ci[1] < 0 and ece.p_examples < 0.01 and ece.p_seeds < 0.01
    assert [o.verdict for o in failed.outcomes] == [FAILS, FAILS, HOLDS]  # ECE, NLL worse; accuracy equal
    assert "other side" in failed.outcomes[0].why


def test_an_indistinguishable_difference_is_not_shown():
    labels = labels_for()
    runs = {("map", 0): predictive(labels, 0.9, 0.2, 1, 0),
            ("laplace_lora", 0): predictive(labels, 0.9, 0.2, 4, 0, spread=0.01)}
    claim = Claim("x", "y", (Comparison("laplace_lora", "map", "nll", "lower"),))
    (result,) = evaluate_claims(claim_data(runs), [claim])
    assert result.verdict == FAILS
    o = result.outcomes[0]
    assert o.ci[0] < 0 < o.ci[1] or "other side" in o.why


def test_missing_runs_and_too_few_examples():
    labels = labels_for(10)
    runs = {("map", 0): predictive(labels, 0.99, 0.2, 1, 0), ("blob", 0): predictive(labels, 0.8, 0.2, 4, 0)}
    blob = next(c for c in CLAIMS if c.name.startswith("BLoB"))
    curve = next(c for c in CLAIMS if "free curve" in c.name)
    (few,), (untested,) = evaluate_claims(claim_data(runs), [blob]), evaluate_claims(claim_data(runs), [curve])
    assert few.verdict == TOO_FEW and "10 paired examples" in few.outcomes[0].why
    assert untested.verdict == NOT_TESTED and "lora_curve" in untested.outcomes[0].why


def test_ratio_and_barrier_checks_read_results_columns():
    labels = labels_for(40)
    runs = {("blora_xs", 0): predictive(labels, 0.9, 0.2, 4, 0), ("swag_lora", 0): predictive(labels, 0.9, 0.2, 4, 0),
            ("lora_curve", 0): predictive(labels, 0.9, 0.2, 4, 0)}
    data = claim_data(runs, posterior_params={"blora_xs": 1_000, "swag_lora": 25_000},
                      barrier_line_0_test={"lora_curve": 0.02}, barrier_curve_0_test={"lora_curve": -0.001})
    ratio = Ratio(fewer="blora_xs", more="swag_lora", column="posterior_params", at_least=10.0)
    assert ratio.evaluate(data, "tiny", "sst2").effect == 25.0
    assert ratio.evaluate(data, "tiny", "sst2").verdict == HOLDS
    assert Ratio("blora_xs", "swag_lora", "posterior_params", 30.0).evaluate(data, "tiny", "sst2").verdict == FAILS
    data.results = data.results.rename(columns={"barrier_line_0_test": "barrier_line_0-1_test",
                                                "barrier_curve_0_test": "barrier_curve_0-1_test"})
    assert Barriers("lora_curve").evaluate(data, "tiny", "sst2").verdict == HOLDS
    data.results.loc[data.results.method == "lora_curve", "barrier_line_0-1_test"] = 0.0
    assert Barriers("lora_curve").evaluate(data, "tiny", "sst2").verdict == FAILS


def test_an_ood_comparison_resamples_both_sets(tmp_path):
    labels, shifted = labels_for(), labels_for(100)
    runs = {}
    for method, spread in (("polar_vbll", 2.0), ("lora_vbll", 0.0)):
        data_id = predictive(labels, 0.9, 0.2, 4, 1, spread=0.1)
        data_ood = predictive(shifted, 0.6, 0.5, 4, 2, spread=0.1 + spread, prefix="ood")
        runs[method] = (data_id, data_ood)
        write(tmp_path, method, 0, data_id, data_ood)
    from benchmarks.report import ReportBuilder
    builder = ReportBuilder(tmp_path)
    check = Comparison("polar_vbll", "lora_vbll", "ood_auroc_mi", "higher")
    out = check.evaluate(builder, "tiny", "sst2")
    assert out.verdict == HOLDS and out.n_examples == 300 and out.ci[0] > 0


# -- in the report ----------------------------------------------------------------------------------------
def test_report_has_the_claims_section_with_both_verdicts(tmp_path):
    labels = labels_for()
    for seed in (0, 1):
        write(tmp_path, "map", seed, predictive(labels, 0.99, 0.2, 1, seed))
        write(tmp_path, "laplace_lora", seed, predictive(labels, 0.77, 0.2, 4, seed, spread=0.02))
        write(tmp_path, "blob", seed, predictive(labels, 0.999, 0.2, 4, seed, spread=0.05))
    files = build_report(tmp_path)
    markdown = files.markdown.read_text()
    section = markdown[markdown.index("## Claims"):markdown.index("## Paired comparison")]
    verdicts = dict(re.findall(r"\| ([^|]*?has lower ECE and NLL than MAP[^|]*?) \|[^|]*\|[^|]*\| ([a-z ]+) \|",
                               section))
    assert verdicts["Laplace-LoRA has lower ECE and NLL than MAP at about equal accuracy"] == HOLDS
    assert verdicts["BLoB has lower ECE and NLL than MAP at about equal accuracy"] == FAILS
    assert "not tested" in section and "missing runs: lora_curve" in section
    assert "Claims" in files.html.read_text()


def test_plugins_add_claims_and_a_broken_plugin_loses_only_its_own(monkeypatch):
    import benchmarks.claims as claims_module

    extra = Claim("mine", "my paper", (Comparison("mine", "map", "nll", "lower"),))

    class EntryPoint(SimpleNamespace):
        def load(self):
            if self.value == "broken":
                raise ImportError("no module named 'missing_dependency'")
            return [extra]

    eps = [EntryPoint(name="good", value="pkg:CLAIMS"), EntryPoint(name="bad", value="broken")]
    monkeypatch.setattr(claims_module, "entry_points", lambda group: eps if group == "bayeslora.claims" else [])
    found, notes = claims_module.registered_claims()
    assert found[: len(CLAIMS)] == list(CLAIMS) and found[-1] is extra
    assert len(notes) == 1 and "'bad'" in notes[0] and "missing_dependency" in notes[0]
