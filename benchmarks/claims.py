"""The seed papers' headline claims, tested on whatever runs a results folder holds.

A claim is data: a name, the paper it comes from, and checks, each of which names the runs it needs.
:data:`CLAIMS` is the table; a method adds its claim there (or a plugin through the ``bayeslora.claims``
entry-point group, a list of :class:`Claim`). Checks:

- :class:`Comparison`: method against baseline on one metric, paired by (model, dataset, seed). With
  delta = m(method) - m(baseline),

      seeds:    mean and std of the per-seed deltas from results.csv; one-sided paired t-test (n >= 2);
      examples: paired bootstrap over the test examples both runs predicted (B resamples of the
                examples, the same resample for both methods and every paired seed, delta averaged over
                seeds); 95% percentile interval, and p = share of resampled deltas on the wrong side.

  ``better="lower"`` holds when the interval lies below ``tolerance`` (0: strictly lower; > 0: "at least
  as good", a non-inferiority margin), ``"higher"`` when it lies above ``-tolerance``, and in both cases
  the seed mean is on the claimed side. ``"similar"`` holds when |mean delta| <= tolerance (a point
  estimate: 200 examples cannot resolve accuracy to 0.02). Metrics with per-example values: acc, nll,
  brier, mi, entropy, ece (re-binned per resample) and ood_auroc_mi / ood_auroc_entropy (ID and OOD
  examples resampled together); any other results column (costs, barriers) is compared on seeds only.
- :class:`Ratio`: value(more) / value(fewer) of a results column, at least ``at_least``.
- :class:`Barriers`: for every anchor pair j-k of a run with path analysis, the straight line's barrier
  exceeds ``min_barrier`` nats and the curve segment's is lower.

Verdicts: ``holds`` (every check holds), ``does not hold`` (a check was tested and failed, with why),
``not tested`` (runs the claim needs are not in the folder, named), ``too few runs`` (they are there but
too few to test: fewer than :data:`MIN_EXAMPLES` paired examples on one seed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Literal, Protocol

import numpy as np
import pandas as pd
import torch
from scipy import stats

from bayeslora.metrics import N_BINS, log_predictive, uncertainty

from .analysis import RunPredictive, run_key

log = logging.getLogger("bayeslora.claims")

HOLDS, FAILS, NOT_TESTED, TOO_FEW = "holds", "does not hold", "not tested", "too few runs"
MIN_EXAMPLES = 20
BOOTSTRAP = 2000
EXAMPLE_METRICS = {"acc", "nll", "brier", "mi", "entropy", "ece", "ood_auroc_mi", "ood_auroc_entropy"}
ENTRY_POINT_GROUP = "bayeslora.claims"


@dataclass
class Outcome:
    """One check's result on one (model, dataset)."""

    check: str
    verdict: str
    why: str = ""
    effect: float = float("nan")
    seed_std: float = float("nan")
    n_seeds: int = 0
    ci: tuple[float, float] = (float("nan"), float("nan"))
    p_seeds: float = float("nan")
    p_examples: float = float("nan")
    n_examples: int = 0


class ClaimData(Protocol):
    """What checks read: the results rows and the saved predictives of a folder."""

    results: pd.DataFrame
    index: dict[tuple[str, str, str, str, int], RunPredictive]


class Check(Protocol):
    def needs(self) -> list[str]: ...
    def describe(self) -> str: ...
    def evaluate(self, data: ClaimData, model: str, dataset: str) -> Outcome: ...


@dataclass(frozen=True)
class Claim:
    """A paper's headline claim: it holds when every check holds."""

    name: str
    source: str
    checks: tuple[Check, ...]

    def needs(self) -> list[str]:
        return list(dict.fromkeys(m for c in self.checks for m in c.needs()))


# -- per-example statistics under bootstrap weights ------------------------------------------------------
def bootstrap_weights(n: int, resamples: int = BOOTSTRAP, seed: int = 0) -> torch.Tensor:
    """(B, n) multiplicities of a resample with replacement: W[b, i] = how often example i was drawn."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(resamples, n,
                                                                                              dtype=torch.float64))


def per_example(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> torch.Tensor:
    """The metric's per-example value, whose mean is the metric: 1[correct], -log p_y, Brier, MI, entropy."""
    log_p = log_predictive(logits)
    if metric == "acc":
        return (log_p.argmax(-1) == labels).double()
    if metric == "nll":
        return -log_p.gather(1, labels[:, None]).squeeze(1)
    if metric == "brier":
        return ((log_p.exp() - torch.nn.functional.one_hot(labels, logits.shape[-1])) ** 2).sum(-1)
    if metric in ("mi", "entropy"):
        return uncertainty(logits)[metric]
    raise ValueError(f"no per-example form for {metric!r}")


def weighted_ece(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 n_bins: int = N_BINS) -> torch.Tensor:
    """ECE of each resample: sum_b |sum_{i in b} w_i (correct_i - conf_i)| / sum_i w_i (the metrics' bins)."""
    confidence, prediction = log_predictive(logits).exp().max(-1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    bins = torch.nn.functional.one_hot(torch.bucketize(confidence, edges, right=True) - 1, n_bins + 1).double()
    gap = ((prediction == labels).double() - confidence)[:, None] * bins
    return (weights @ gap).abs().sum(-1) / weights.sum(-1)


def weighted_auroc(score_ood: torch.Tensor, score_id: torch.Tensor, w_ood: torch.Tensor,
                   w_id: torch.Tensor) -> torch.Tensor:
    """AUROC of each resample: sum_ij w_i w_j (1[s_i > s_j] + 0.5 1[s_i = s_j]) / (sum w_i sum w_j)."""
    wins = (score_ood[:, None] > score_id[None, :]).double() + 0.5 * (score_ood[:, None] == score_id[None, :]).double()
    return ((w_ood @ wins) * w_id).sum(-1) / (w_ood.sum(-1) * w_id.sum(-1))


def aligned(a: RunPredictive, b: RunPredictive, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of both runs and the labels, restricted to ``ids`` in that order."""
    pos_a = {e: i for i, e in enumerate(a.predictive.example_ids)}
    pos_b = {e: i for i, e in enumerate(b.predictive.example_ids)}
    ia, ib = [pos_a[e] for e in ids], [pos_b[e] for e in ids]
    return a.predictive.logits[ia], b.predictive.logits[ib], a.predictive.labels[ia]


def common_ids(runs: list[RunPredictive]) -> list[str]:
    ids = set(runs[0].predictive.example_ids)
    for r in runs[1:]:
        ids &= set(r.predictive.example_ids)
    return [e for e in runs[0].predictive.example_ids if e in ids]


# -- checks ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """delta = metric(method) - metric(baseline) is lower / higher / about zero (see the module docstring)."""

    method: str
    baseline: str
    metric: str
    better: Literal["lower", "higher", "similar"]
    tolerance: float = 0.0
    eval_set: str | None = None
    """None: the dataset's own test set; "ood": each of its OOD sets (for ood_auroc_* metrics)."""

    def needs(self) -> list[str]:
        return [self.method, self.baseline]

    def describe(self) -> str:
        relation = {"lower": "<", "higher": ">", "similar": "≈"}[self.better]
        slack = ""
        if self.tolerance:
            slack = f" (within {self.tolerance:g})" if self.better == "similar" else f" (margin {self.tolerance:g})"
        return f"{self.metric}: {self.method} {relation} {self.baseline}{slack}"

    def _sign(self) -> float:
        return -1.0 if self.better == "lower" else 1.0

    def evaluate(self, data: ClaimData, model: str, dataset: str) -> Outcome:
        rows = data.results[(data.results.model == model) & (data.results.dataset == dataset)]
        if self.metric.startswith("ood_"):
            rows = rows[rows.eval_set != dataset]
        else:
            rows = rows[rows.eval_set == dataset]
        if self.metric not in rows.columns:
            return Outcome(self.describe(), NOT_TESTED, f"no {self.metric} column in the results")
        a = rows[rows.method == self.method].groupby("seed")[self.metric].mean()
        b = rows[rows.method == self.baseline].groupby("seed")[self.metric].mean()
        missing = [m for m, s in ((self.method, a), (self.baseline, b)) if s.empty]
        if missing:
            return Outcome(self.describe(), NOT_TESTED, "missing runs: " + ", ".join(missing))
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            return Outcome(self.describe(), NOT_TESTED,
                           f"no common seed ({self.method}: {sorted(a.index)}, {self.baseline}: {sorted(b.index)})")
        deltas = (a.loc[seeds] - b.loc[seeds]).to_numpy(dtype=float)
        out = Outcome(self.describe(), HOLDS, effect=float(deltas.mean()), n_seeds=len(seeds),
                      seed_std=float(deltas.std(ddof=1)) if len(seeds) > 1 else 0.0)
        if len(seeds) > 1 and not np.allclose(deltas, deltas[0]):
            test = stats.ttest_1samp(deltas, 0.0, alternative="two-sided" if self.better == "similar" else
                                     "less" if self.better == "lower" else "greater")
            out.p_seeds = float(test.pvalue)
        if self.metric in EXAMPLE_METRICS:
            self._bootstrap(data, model, dataset, seeds, out)
        return self._verdict(out)

    def _bootstrap(self, data: ClaimData, model: str, dataset: str, seeds: list[int], out: Outcome) -> None:
        """Fill the example-level interval and p-value (left NaN where predictives are missing)."""
        deltas = []
        ood = self.metric.startswith("ood_")
        eval_sets = sorted(set(data.results.eval_set[(data.results.dataset == dataset)]) - {dataset}) if ood else []
        weights: dict[str, torch.Tensor] = {}
        for seed in seeds:
            for eval_set in eval_sets or [dataset]:
                pair = [data.index.get(run_key(model, dataset, dataset, m, seed)) for m in (self.method, self.baseline)]
                if ood:
                    pair += [data.index.get(run_key(model, dataset, eval_set, m, seed))
                             for m in (self.method, self.baseline)]
                if any(p is None for p in pair):
                    continue
                delta, n = self._resampled_delta(pair, weights, eval_set)
                if delta is not None:
                    deltas.append(delta)
                    out.n_examples = max(out.n_examples, n)
        if not deltas:
            return
        d = torch.stack(deltas).mean(0).numpy()
        out.ci = (float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975)))
        if self.better != "similar":
            out.p_examples = float(((self._sign() * d) <= 0).mean())

    def _resampled_delta(self, pair: list[RunPredictive], weights: dict[str, torch.Tensor],
                         eval_set: str) -> tuple[torch.Tensor | None, int]:
        """delta under each bootstrap resample (the same resample for every seed, kept in ``weights``)."""
        ids = common_ids(pair[:2])
        if len(ids) < 2:
            return None, len(ids)
        la, lb, labels = aligned(pair[0], pair[1], ids)
        w = weights.setdefault("id", bootstrap_weights(len(ids)))
        if w.shape[1] != len(ids):
            return None, len(ids)
        if self.metric == "ece":
            return weighted_ece(la, labels, w) - weighted_ece(lb, labels, w), len(ids)
        if self.metric.startswith("ood_"):
            score = self.metric.removeprefix("ood_auroc_")
            ood_ids = common_ids(pair[2:])
            oa, ob, _ = aligned(pair[2], pair[3], ood_ids)
            w_ood = weights.setdefault(f"ood-{eval_set}", bootstrap_weights(len(ood_ids), seed=1))
            if w_ood.shape[1] != len(ood_ids):
                return None, len(ids)
            ua, ub = uncertainty(la)[score], uncertainty(lb)[score]
            va, vb = uncertainty(oa)[score], uncertainty(ob)[score]
            return weighted_auroc(va, ua, w_ood, w) - weighted_auroc(vb, ub, w_ood, w), len(ids) + len(ood_ids)
        diff = per_example(la, labels, self.metric) - per_example(lb, labels, self.metric)
        return (w @ diff) / w.sum(-1), len(ids)

    def _verdict(self, out: Outcome) -> Outcome:
        low, high = out.ci
        has_ci = not np.isnan(low)
        if not has_ci and out.n_seeds < 2 and self.metric in EXAMPLE_METRICS:
            out.verdict, out.why = TOO_FEW, "one seed and no per-example predictives to resample"
            return out
        if has_ci and out.n_examples < MIN_EXAMPLES and out.n_seeds < 2:
            out.verdict, out.why = TOO_FEW, f"{out.n_examples} paired examples on one seed (< {MIN_EXAMPLES})"
            return out
        if self.better == "similar":
            ok = abs(out.effect) <= self.tolerance
            out.verdict = HOLDS if ok else FAILS
            out.why = f"Δ = {out.effect:+.4f} is {'within' if ok else 'outside'} ±{self.tolerance:g}"
            return out
        s = self._sign()
        seed_side = s * out.effect > 0 or (self.tolerance > 0 and s * out.effect > -self.tolerance)
        if has_ci:
            bound = high if self.better == "lower" else low
            interval_side = s * bound > -self.tolerance if self.tolerance else s * bound > 0
        else:
            interval_side = out.p_seeds < 0.05
        if seed_side and interval_side:
            out.verdict = HOLDS
        elif not seed_side:
            out.verdict, out.why = FAILS, f"the mean difference {out.effect:+.4g} is on the other side"
        else:
            where = f"95% interval [{low:+.4g}, {high:+.4g}]" if has_ci else f"seed-level p = {out.p_seeds:.3g}"
            limit = f"the margin {self.tolerance:g}" if self.tolerance else "0"
            out.verdict, out.why = FAILS, f"not shown: the {where} reaches past {limit}"
        return out


@dataclass(frozen=True)
class Ratio:
    """value(more) / value(fewer) of a results column (mean over seeds) is at least ``at_least``
    (``at_least=0`` reports the ratio without a condition)."""

    fewer: str
    more: str
    column: str
    at_least: float

    def needs(self) -> list[str]:
        return [self.fewer, self.more]

    def describe(self) -> str:
        return f"{self.column}: {self.more} / {self.fewer}" + (f" ≥ {self.at_least:g}" if self.at_least else "")

    def evaluate(self, data: ClaimData, model: str, dataset: str) -> Outcome:
        rows = data.results[(data.results.model == model) & (data.results.dataset == dataset)
                            & (data.results.eval_set == dataset)]
        values = {m: rows[rows.method == m][self.column].dropna() if self.column in rows.columns else pd.Series()
                  for m in self.needs()}
        missing = [m for m, v in values.items() if v.empty]
        if missing:
            return Outcome(self.describe(), NOT_TESTED, "missing runs: " + ", ".join(missing))
        ratio = float(values[self.more].mean() / values[self.fewer].mean())
        ok = ratio >= self.at_least
        return Outcome(self.describe(), HOLDS if ok else FAILS, f"ratio {ratio:,.2f}", effect=ratio,
                       n_seeds=min(len(v) for v in values.values()))


@dataclass(frozen=True)
class Barriers:
    """On every seed's path analysis of ``method``: line_j-k's barrier > min_barrier and curve_j-k's lower."""

    method: str
    split: str = "test"
    min_barrier: float = 1e-3

    def needs(self) -> list[str]:
        return [self.method]

    def describe(self) -> str:
        return f"barriers ({self.split}): line_j-k > {self.min_barrier:g} nats > curve_j-k, {self.method}"

    def evaluate(self, data: ClaimData, model: str, dataset: str) -> Outcome:
        rows = data.results[(data.results.model == model) & (data.results.dataset == dataset)
                            & (data.results.eval_set == dataset) & (data.results.method == self.method)]
        if rows.empty:
            return Outcome(self.describe(), NOT_TESTED, f"missing runs: {self.method}")
        suffix = f"_{self.split}"
        pairs = sorted({c.removeprefix("barrier_curve_").removesuffix(suffix) for c in rows.columns
                        if c.startswith("barrier_curve_") and c.endswith(suffix)
                        and f"barrier_line_{c.removeprefix('barrier_curve_')}" in rows.columns})
        measured = rows[[f"barrier_line_{p}{suffix}" for p in pairs]].notna().all(axis=1) if pairs else None
        if not pairs or not measured.any():
            return Outcome(self.describe(), NOT_TESTED, f"no path analysis of {self.method} on {self.split}: add "
                           f"`path: {{methods: [{self.method}]}}` to the suite")
        rows = rows[measured]
        line = rows[[f"barrier_line_{p}{suffix}" for p in pairs]].to_numpy(dtype=float)
        curve = rows[[f"barrier_curve_{p}{suffix}" for p in pairs]].to_numpy(dtype=float)
        gap = line - curve
        ok = bool((line > self.min_barrier).all() and (gap > 0).all())
        why = (f"segments {', '.join(pairs)}: line barriers {np.round(line.mean(0), 4).tolist()}, "
               f"curve barriers {np.round(curve.mean(0), 4).tolist()} nats")
        return Outcome(self.describe(), HOLDS if ok else FAILS, why, effect=float(gap.mean()), n_seeds=len(rows),
                       seed_std=float(gap.mean(1).std(ddof=1)) if len(rows) > 1 else 0.0)


# -- the table ------------------------------------------------------------------------------------------
def calibration_vs(method: str, baseline: str = "map", acc_tolerance: float = 0.02) -> tuple[Check, ...]:
    """ECE and NLL below the baseline's at about equal accuracy."""
    return (Comparison(method, baseline, "ece", "lower"), Comparison(method, baseline, "nll", "lower"),
            Comparison(method, baseline, "acc", "similar", acc_tolerance))


LORA_CURVE = "LoRA-Curve (this project's seed method; docs/methods.md)"
CLAIMS: tuple[Claim, ...] = (
    Claim("Straight lines between independent optima show loss barriers that the curve avoids", LORA_CURVE,
          (Barriers("lora_curve"),)),
    Claim("The curve's predictive has higher MI than the ensemble of its anchors, at about equal accuracy",
          LORA_CURVE, (Comparison("lora_curve", "ensemble", "mi", "higher"),
                       Comparison("lora_curve", "ensemble", "acc", "similar", 0.02))),
    Claim("The Jensen-Shannon regulariser raises the curve's MI", LORA_CURVE,
          (Comparison("lora_curve", "lora_curve-nojs", "mi", "higher"),)),
    Claim("Flat-minima perturbations raise the curve's MI", LORA_CURVE,
          (Comparison("lora_curve-flat", "lora_curve", "mi", "higher"),)),
    Claim("A free curve reaches more diverse functions (higher MI) than an anchored one, at about equal accuracy",
          LORA_CURVE, (Comparison("lora_curve-free", "lora_curve", "mi", "higher"),
                       Comparison("lora_curve-free", "lora_curve", "acc", "similar", 0.02))),
    Claim("B-LoRA-XS is calibrated at least as well as LoRA-XS and MAP with at least 10x fewer posterior "
          "parameters than SWAG-LoRA", "Marszałek et al. 2025, Minimal ranks, maximum confidence",
          (Comparison("blora_xs", "lora_xs", "ece", "lower", 0.01), Comparison("blora_xs", "map", "ece", "lower", 0.01),
           Ratio(fewer="blora_xs", more="swag_lora", column="posterior_params", at_least=10.0))),
    Claim("Bayesian-LoRA has lower ECE and NLL than LoRA at about equal accuracy", "Bayesian-LoRA (inducing weights)",
          (*calibration_vs("bayesian_lora"),
           Ratio(fewer="map", more="bayesian_lora", column="trainable_params", at_least=0.0))),
    Claim("PoLAR-VBLL is better calibrated than LoRA + VBLL and separates OOD inputs better",
          "PoLAR-VBLL (kcc-lion/polar)",
          (Comparison("polar_vbll", "lora_vbll", "ece", "lower"),
           Comparison("polar_vbll", "lora_vbll", "ood_auroc_mi", "higher"))),
    Claim("Laplace-LoRA has lower ECE and NLL than MAP at about equal accuracy", "Yang et al. 2024, ICLR",
          calibration_vs("laplace_lora")),
    Claim("BLoB has lower ECE and NLL than MAP at about equal accuracy", "Wang et al. 2024, NeurIPS",
          calibration_vs("blob")),
    Claim("TFB is calibrated at least about as well as BLoB (ECE at most 0.02 above) without training: its fit "
          "takes under half of BLoB's time", "Shi et al. 2025, NeurIPS",
          (Comparison("tfb", "blob", "ece", "lower", 0.02),
           Ratio(fewer="tfb", more="blob", column="fit_seconds", at_least=2.0))),
    Claim("ScalaBL is calibrated about as well as BLoB (ECE at most 0.02 above) with at least 100x fewer "
          "posterior parameters", "Samplawski et al. 2025, UAI",
          (Comparison("scalabl", "blob", "ece", "lower", 0.02),
           Ratio(fewer="scalabl", more="blob", column="posterior_params", at_least=100.0))),
    Claim("IVON-LoRA has lower ECE and NLL than AdamW-trained LoRA at about equal accuracy",
          "Shen et al. 2024, ICML; Cong et al. 2024", calibration_vs("ivon")),
)


def registered_claims() -> tuple[list[Claim], list[str]]:
    """The built-in table plus the claims plugins list under ``bayeslora.claims`` (each entry point: a
    list of :class:`Claim`); and a note for each plugin whose claims could not be loaded."""
    claims, notes = list(CLAIMS), []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            extra = list(loaded() if callable(loaded) else loaded)
            if not all(isinstance(c, Claim) for c in extra):
                raise TypeError("it must be a list of benchmarks.claims.Claim")
            claims += extra
        except Exception as exc:  # a broken plugin loses its own claims only
            notes.append(f"claims of plugin {ep.name!r} ({ep.value}) not loaded: {exc}")
    return claims, notes


@dataclass
class ClaimResult:
    claim: Claim
    model: str
    dataset: str
    verdict: str
    outcomes: list[Outcome] = field(default_factory=list)


def combine(outcomes: list[Outcome]) -> str:
    """not tested if any check lacks runs; else does not hold if any fails; too few runs; else holds."""
    verdicts = [o.verdict for o in outcomes]
    for v in (NOT_TESTED, FAILS, TOO_FEW):
        if v in verdicts:
            return v
    return HOLDS


def evaluate_claims(data: ClaimData, claims: list[Claim] | None = None) -> list[ClaimResult]:
    """Every claim on every (model, dataset) of the folder; a claim none of whose methods ran anywhere is
    reported once as not tested."""
    claims = list(CLAIMS) if claims is None else claims
    results = data.results
    groups = results[results.eval_set == results.dataset][["model", "dataset"]].drop_duplicates()
    out = []
    for claim in claims:
        needed = set(claim.needs())
        tested = False
        for model, dataset in groups.itertuples(index=False):
            present = set(results.method[(results.model == model) & (results.dataset == dataset)])
            if not needed & present:
                continue
            outcomes = [check.evaluate(data, model, dataset) for check in claim.checks]
            out.append(ClaimResult(claim, model, dataset, combine(outcomes), outcomes))
            tested = True
        if not tested:
            out.append(ClaimResult(claim, "–", "–", NOT_TESTED, [Outcome(
                "all", NOT_TESTED, "missing runs: " + ", ".join(sorted(needed)))]))
    return out


def claims_table(results: list[ClaimResult]) -> pd.DataFrame:
    """One row per check: the claim, its source, where it was tested, effect and uncertainty, verdicts."""
    rows = []
    for r in results:
        for o in r.outcomes:
            rows.append({"claim": r.claim.name, "source": r.claim.source, "model": r.model, "dataset": r.dataset,
                         "claim verdict": r.verdict, "check": o.check, "check verdict": o.verdict, "why": o.why,
                         "effect": o.effect, "seed std": o.seed_std, "seeds": o.n_seeds,
                         "ci95_low": o.ci[0], "ci95_high": o.ci[1], "p_seeds": o.p_seeds,
                         "p_examples": o.p_examples, "examples": o.n_examples})
    return pd.DataFrame(rows)
