"""The comparison report of a results folder: ``bayeslora report OUT -o OUT/report.html``.

Sections: what is missing; the leaderboard per (model, dataset, eval set) with its protocol; the seed
papers' claims tested on the folder's runs (:mod:`benchmarks.claims`); paired differences against MAP;
reliability diagrams; selective prediction; metrics against the number of samples S; MI / entropy
histograms in vs out of distribution; loss and accuracy along weight-space paths (runs with path.csv);
where the time went; the suite as run. Whatever subset of methods, datasets and files is present is
drawn, and each absent part is named in a note instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bayeslora import ConfigError
from bayeslora.metrics import ece_from_bins
from bayeslora.paths import PATH_BASE_COLUMNS, barrier_table

from . import figures
from .analysis import (
    RunPredictive,
    by_run,
    coverage_curve,
    load_predictives,
    metrics_vs_samples,
    pooled_reliability,
    run_key,
    uncertainty_scores,
)
from .claims import BOOTSTRAP, MIN_EXAMPLES, claims_table, evaluate_claims, registered_claims
from .leaderboard import (
    COSTS,
    HEADERS,
    aggregate,
    cache_table,
    format_seconds,
    group_title,
    leaderboard_groups,
    not_applicable_notes,
    phase_table,
)
from .merge import folder_labels, merged_results, provenance_table
from .pairwise import ALPHA, COMPARED, pairwise_table, significance_marks
from .report_render import Code, Figure, Note, Section, Table, Text, render_html, render_markdown, slugify
from .store import read_manifest, run_file_intact, suite_run_ids

log = logging.getLogger("bayeslora.report")
GROUP_KEYS = ["model", "dataset", "eval_set"]


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    notes: list[str]


class ReportBuilder:
    """Collects a results folder's tables, predictives and path files, and turns them into sections."""

    def __init__(self, out_dirs: Path | list[Path], reference: str | list[str] | None = None, pool: bool = False):
        self.dirs = [out_dirs] if isinstance(out_dirs, Path) else list(out_dirs)
        self.labels = folder_labels(self.dirs)
        self.results = merged_results(self.dirs, pool=pool)
        self.references = [reference] if isinstance(reference, str) else reference or self.map_labels()
        self.predictives, missing_files = load_predictives(self.dirs, self.results)
        self.index = by_run(self.predictives)
        self.methods = list(dict.fromkeys(self.results.method))
        self.colors = figures.method_colors(self.methods)
        self.notes: list[str] = [f"Predictive file missing or damaged, left out of the figures: {m}"
                                 for m in missing_files]

    # -- helpers -------------------------------------------------------------------------------
    def map_labels(self) -> list[str]:
        """The labels of every ``map`` entry (e.g. ``map`` and a fixed-budget ``map-6ep``), so each method
        is also compared with the MAP adapter it starts from; ``["map"]`` when there is none."""
        if "method_name" not in self.results.columns:
            return ["map"]
        return list(dict.fromkeys(self.results.method[self.results.method_name == "map"])) or ["map"]

    def groups(self):
        """(model, dataset, eval set) and its result rows."""
        yield from self.results.groupby(GROUP_KEYS, sort=False)

    def method_predictives(self, keys: tuple[str, str, str], rows: pd.DataFrame) -> dict[str, list[RunPredictive]]:
        """Predictives of one group, per method (all seeds)."""
        out: dict[str, list[RunPredictive]] = {}
        for row in rows.itertuples(index=False):
            found = self.index.get(run_key(*keys, row.method, row.seed))
            if found is not None:
                out.setdefault(row.method, []).append(found)
        return out

    def n_bins(self, rows: pd.DataFrame) -> int:
        return int(rows["n_bins"].iloc[0]) if "n_bins" in rows.columns else 15

    # -- sections --------------------------------------------------------------------------------
    def missing_runs(self) -> list[str]:
        notes = []
        done = set(self.results.run_id)
        for folder, label in zip(self.dirs, self.labels, strict=True):
            wanted = suite_run_ids(folder)
            lost = sorted((wanted or set()) - done)
            if not lost:
                continue
            manifest = read_manifest(folder)
            titles = manifest["titles"] if manifest is not None else {}
            where = f" of {label}" if len(self.dirs) > 1 else ""
            notes.append(f"{len(lost)} of the suite's {len(wanted)} runs{where} have not finished (run `bayeslora "
                         f"run` again to resume): " + "; ".join(titles.get(r, r) for r in lost))
        return notes

    def run_dir(self, row: Any) -> Path:
        """A results row's run folder: the folder it was read from (by position) / runs / its checked run id."""
        return self.dirs[int(getattr(row, "folder", 0))] / "runs" / str(row.run_id)

    def leaderboard_section(self) -> Section:
        agg = aggregate(self.results)
        section = Section("Leaderboard", [Text(
            "Mean ± std over seeds (no ± where a method ran one seed), ranked by NLL; the best value of each "
            "quality column is in bold. Under each table, its costs: trainable parameters, posterior (stored) "
            "parameters, fit and predict seconds, backbone forward passes per example at prediction, peak memory "
            "in MB (mean over seeds). The full numbers with 95% t-intervals are in leaderboard.csv.")])
        cost_headers = [HEADERS[c] for c in COSTS]
        for keys, protocol, table, marks in leaderboard_groups(self.results, agg):
            quality = [c for c in table.columns if c not in cost_headers]
            costs = [table.columns[0]] + [c for c in table.columns if c in cost_headers]
            section.blocks += [Text(f"{group_title(keys)}. Protocol: {protocol}."),
                               Table(table[quality], marks[quality]), Table(table[costs], caption="Costs:")]
        section.blocks += [Note(f"n/a: {n}") for n in not_applicable_notes(agg)]
        return section

    def claims_section(self) -> Section:
        claims, plugin_notes = registered_claims()
        section = Section("Claims", [Text(
            "Each seed paper's headline claim, tested on the runs this folder holds. Effect: the mean over paired "
            "seeds of method − baseline (± its std over seeds); 95% interval and p (examples): a paired bootstrap "
            "over the test examples both runs predicted, averaged over the paired seeds; p (seeds): one-sided "
            "paired t-test over seeds (two or more). A claim holds when every check holds; \"about equal\" "
            "accuracy is read from the point estimate. Verdicts: holds / does not hold (with why) / not tested "
            "(the runs it needs are missing) / too few runs (fewer than "
            f"{MIN_EXAMPLES} paired examples on one seed). The table of claims is `benchmarks.claims.CLAIMS`.")])
        table = claims_table(evaluate_claims(self, claims))
        summary = table.drop_duplicates(["claim", "model", "dataset"])[["claim", "source", "dataset",
                                                                        "claim verdict"]]
        section.blocks.append(Table(summary.rename(columns={"claim verdict": "verdict"}).reset_index(drop=True)))
        shown = pd.DataFrame({
            "claim": table["claim"].str.slice(0, 48), "dataset": table["dataset"], "check": table["check"],
            "effect": [effect_text(e, s, n) for e, s, n in zip(table["effect"], table["seed std"], table["seeds"],
                                                                 strict=True)],
            "95% interval (examples)": [interval_text(lo, hi) for lo, hi in zip(table["ci95_low"],
                                                                                table["ci95_high"], strict=True)],
            "p (seeds)": [number_text(p) for p in table["p_seeds"]],
            "p (examples)": [f"< {1 / BOOTSTRAP:g}" if p == 0 else number_text(p) for p in table["p_examples"]],
            "verdict": table["check verdict"], "why": table["why"]})
        section.blocks.append(Table(shown.reset_index(drop=True), caption="Checks:"))
        section.blocks += [Note(n) for n in plugin_notes]
        self.notes += plugin_notes
        return section

    def pairwise_section(self, reference: str) -> Section:
        section = Section(f"Paired comparison with {reference}")
        table = pairwise_table(self.results, self.predictives, reference=reference)
        if table.empty:
            section.blocks.append(Note(f"No {reference} runs to pair with in this folder, so there is no "
                                       f"paired comparison; add `{reference}` to the suite's methods."))
            self.notes.append(f"paired comparison skipped: no {reference} runs")
            return section
        section.blocks.append(Text(
            f"Differences method − {reference} on runs paired by seed (mean ± std over the n paired seeds). "
            f"* : paired t-test over seeds, p < {ALPHA}. † (NLL only): Wilcoxon signed-rank test over test "
            f"examples of the per-example NLL difference (averaged over the paired seeds), p < {ALPHA}; it "
            f"applies to single-seed methods too. No correction for multiple comparisons."))
        for keys, rows in table.groupby(GROUP_KEYS, sort=False):
            shown = pd.DataFrame({"method": rows.method, "paired seeds": rows.n_pairs})
            for m in COMPARED:
                if f"delta_{m}_mean" in rows.columns:
                    shown[f"Δ{m}"] = [
                        f"{r[f'delta_{m}_mean']:+.4f}" + (f" ± {r[f'delta_{m}_std']:.4f}" if r.n_pairs > 1 else "")
                        + significance_marks(r, m) for _, r in rows.iterrows()]
            shown["p (seeds, NLL)"] = p_values(rows, "p_seeds_nll")
            shown["p (examples, NLL)"] = p_values(rows, "p_examples_nll")
            section.blocks += [Text(group_title(keys) + "."), Table(shown.reset_index(drop=True))]
        return section

    def group_figures(self, section: Section, slug: str, caption: str, draw: Any,
                      keep: Any = None) -> bool:
        """One figure per (model, dataset, eval set) with predictives: ``draw(keys, rows, per_method)``;
        ``keep`` filters the rows first. Returns whether any figure was drawn."""
        drawn = False
        for keys, rows in self.groups():
            rows = keep(rows) if keep is not None else rows
            per_method = self.method_predictives(keys, rows)
            if not per_method:
                continue
            fig = draw(keys, rows, {m: [r.predictive for r in runs] for m, runs in per_method.items()})
            section.blocks.append(Figure(slugify(slug, *keys), figures.png_bytes(fig),
                                         f"{caption}: {group_title(keys)}"))
            drawn = True
        return drawn

    def reliability_section(self) -> Section:
        section = Section("Reliability diagrams", [Text(
            "Accuracy per bin of top-label confidence (equal-width bins, the ECE's binning), pooled over seeds; "
            "red: the gap to the diagonal; grey: the share of examples in each bin.")])

        def draw(keys, rows, per_method):
            bins = {m: pooled_reliability(preds, self.n_bins(rows)) for m, preds in per_method.items()}
            return figures.reliability_figure({m: (b, ece_from_bins(b)) for m, b in bins.items()}, group_title(keys))

        self.group_figures(section, "reliability", "Reliability diagrams", draw)
        return section

    def selective_section(self) -> Section:
        section = Section("Selective prediction", [Text(
            "Accuracy on the most confident fraction of the examples (the rest abstained on), averaged over seeds. "
            "The area under the matching risk curve is the leaderboard's AURC.")])

        def draw(keys, rows, per_method):
            curves = {m: coverage_curve(preds) for m, preds in per_method.items()}
            return figures.coverage_figure(curves, self.colors, group_title(keys))

        self.group_figures(section, "coverage", "Accuracy against coverage", draw)
        return section

    def samples_section(self) -> Section:
        section = Section("Metrics against the number of samples", [Text(
            "Accuracy, ECE and NLL of the predictive built from s of the S stored samples (evenly spaced sample "
            "indices; for lora_curve's grid that is a coarser grid over the same range), mean over seeds. "
            "Deterministic methods (S = 1) are not drawn.")])

        def draw(keys, rows, per_method):
            tables = {m: metrics_vs_samples(preds, self.n_bins(rows)) for m, preds in per_method.items()}
            return figures.samples_figure(tables, self.colors, group_title(keys))

        if not self.group_figures(section, "samples", "Accuracy / ECE / NLL against S", draw,
                                  keep=lambda rows: rows[rows.num_samples > 1]):
            section.blocks.append(Note("No sampling method (S > 1) in this folder."))
            self.notes.append("metrics-vs-S plots skipped: no sampling method (S > 1)")
        return section

    def ood_section(self) -> Section:
        section = Section("Out-of-distribution detection", [Text(
            "Per-example mutual information (epistemic) and predictive entropy (total uncertainty) on the "
            "in-distribution test set and on each OOD set, all seeds pooled; AUROC of the score for telling OOD "
            "(positive) from in-distribution examples, as in the leaderboard's ood_auroc columns (mean over seeds).")])
        ood = self.results[self.results.dataset != self.results.eval_set]
        if ood.empty:
            section.blocks.append(Note("No out-of-distribution evaluation sets in this folder: give a dataset "
                                       "`ood: [...]` in the suite (e.g. `{name: obqa, ood: [arc_challenge]}`)."))
            self.notes.append("OOD histograms skipped: no OOD evaluation sets")
            return section
        for (model, dataset, eval_set), rows in ood.groupby(GROUP_KEYS, sort=False):
            panels = {}
            for method, method_rows in rows.groupby("method", sort=False):
                seeds = [int(s) for s in method_rows.seed]
                id_runs = [self.index.get(run_key(model, dataset, dataset, method, s)) for s in seeds]
                ood_runs = [self.index.get(run_key(model, dataset, eval_set, method, s)) for s in seeds]
                if any(r is None for r in id_runs + ood_runs):
                    continue
                id_u = uncertainty_scores([r.predictive for r in id_runs])
                ood_u = uncertainty_scores([r.predictive for r in ood_runs])
                panels[method] = {score: (id_u[score], ood_u[score], float(method_rows[f"ood_auroc_{score}"].mean()))
                                  for score in ("mi", "entropy")}
            if panels:
                title = f"{model} · trained on {dataset} · in distribution {dataset} vs OOD {eval_set}"
                fig = figures.uncertainty_histograms(panels, title, dataset, eval_set)
                section.blocks.append(Figure(slugify("ood", model, dataset, eval_set), figures.png_bytes(fig), title))
        return section

    def paths_section(self) -> Section:
        section = Section("Weight-space paths", [Text(
            "Mean loss and accuracy along each path of a run with path analysis (lora_curve): `curve_j-k` is the "
            "trained curve's segment from anchor j to anchor k, `line_j-k` the straight line between the same "
            "anchors (every pair of anchors has one). Barrier = max loss along the path − max of its end losses. "
            "Functional diversity along t (path.csv): disagreement and Jensen–Shannon divergence of the point's "
            "predictive with the path's start and end, and the mutual information of each point's grid "
            "neighbourhood; the table gives their largest values and the mean local MI per path.")])
        found = False
        runs = self.results.drop_duplicates("run_id")
        for row in runs.itertuples(index=False):
            run_dir = self.run_dir(row)
            path_file = run_dir / "path.csv"
            if not path_file.exists():
                continue
            try:
                table = pd.read_csv(path_file)
                if not run_file_intact(run_dir, "path.csv") or not set(PATH_BASE_COLUMNS) <= set(table.columns):
                    raise ValueError("it does not match its checksum or columns")
            except (ValueError, pd.errors.ParserError) as exc:
                self.notes.append(f"path plot skipped: {path_file} is damaged ({exc})")
                continue
            title = f"{row.method} · {row.dataset} · seed {row.seed}"
            fig = figures.path_figure(table, title)
            section.blocks += [Figure(slugify("path", row.method, row.dataset, row.seed), figures.png_bytes(fig),
                                      f"Loss and accuracy along the paths: {title}"),
                               Table(barrier_table(table).round(4), caption=f"Barrier heights: {title}")]
            found = True
        if not found:
            section.blocks.append(Note("No path.csv in any run: add `path: {methods: [lora_curve]}` to the suite, "
                                       "or run `bayeslora path OUT/runs/<run-id>` on a lora_curve run."))
            self.notes.append("path plots skipped: no run has path.csv")
        return section

    def cost_section(self) -> Section:
        section = Section("Where the time went")
        profile = phase_table(self.results)
        if profile.empty:
            section.blocks.append(Note("These runs carry no per-phase profile (time_* columns)."))
        else:
            section.blocks += [Text("Exclusive wall-clock seconds per phase, summed over each method's runs."),
                               Table(format_seconds(profile))]
        caches = cache_table(self.results)
        if not caches.empty:
            section.blocks += [Text(
                "Filling the shared caches (trunk states, MAP-adapter features, trained MAP adapters) is charged to "
                "the cache, not to the fit or predict seconds of whichever run filled it; the leaderboard's \"MAP "
                "training s\" is the training time of the MAP adapters a method builds on, the same on a cache hit "
                "or miss."),
                Table(format_seconds(caches), caption="Shared caches:")]
        return section

    def suite_section(self) -> Section:
        section = Section("The suite as run" if len(self.dirs) == 1 else "The suites as run")
        if len(self.dirs) > 1:
            section.blocks += [Text(
                "Where each row comes from. A method that two folders ran under different protocols (settings, "
                "model or data; not seeds or code) is listed per folder as `method @ folder` unless pooled "
                "(`--pool`)."), Table(provenance_table(self.results))]
        for folder, label in zip(self.dirs, self.labels, strict=True):
            suite_file = folder / "suite.yaml"
            if len(self.dirs) > 1:
                section.blocks.append(Text(f"{label}:"))
            section.blocks.append(Code(suite_file.read_text()) if suite_file.exists()
                                  else Note(f"suite.yaml is missing from {label}."))
        return section

    def build(self) -> tuple[str, list[Section]]:
        body = [self.leaderboard_section(), self.claims_section(),
                *[self.pairwise_section(r) for r in self.references],
                self.reliability_section(),
                self.selective_section(), self.samples_section(), self.ood_section(), self.paths_section(),
                self.cost_section(), self.suite_section()]
        self.notes = self.missing_runs() + self.notes
        n_runs = self.results.run_id.nunique()
        where = ("this folder's runs/*/metrics.json and predictive files" if len(self.dirs) == 1 else
                 f"the runs/*/metrics.json and predictive files of {', '.join(self.labels)}")
        overview = Section("Overview", [Text(
            f"{n_runs} runs: {len(self.methods)} methods ({', '.join(self.methods)}) on "
            f"{', '.join(dict.fromkeys(self.results.dataset))}, models {', '.join(dict.fromkeys(self.results.model))}. "
            f"Every number and figure is computed from {where}.")])
        overview.blocks += [Note(n) for n in self.notes] or [Text("Nothing is missing: every section is drawn.")]
        suites = list(dict.fromkeys(self.results.suite)) if "suite" in self.results.columns else self.labels
        return f"bayeslora report: {' + '.join(map(str, suites))}", [overview, *body]


def number_text(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.3g}"


def effect_text(effect: float, std: float, n_seeds: int) -> str:
    """'+0.0123 ± 0.0040' (no ± for one seed)."""
    if pd.isna(effect):
        return "–"
    return f"{effect:+.4g}" + (f" ± {std:.2g}" if n_seeds > 1 and not pd.isna(std) else "")


def interval_text(low: float, high: float) -> str:
    return "–" if pd.isna(low) else f"[{low:+.4g}, {high:+.4g}]"


def p_values(rows: pd.DataFrame, column: str) -> list[str]:
    """p-values as text: "n/a (<reason>)" where the differences are at float noise, "–" where no test ran."""
    values = rows.get(column, pd.Series(float("nan"), rows.index))
    notes = rows.get(f"{column}_na", pd.Series(None, rows.index, dtype=object))
    return [f"n/a ({note})" if isinstance(note, str) else "–" if pd.isna(v) else f"{v:.3g}"
            for v, note in zip(values, notes, strict=True)]


def build_report(out_dirs: str | Path | list[str | Path], html_path: str | Path | None = None,
                 reference: str | list[str] | None = None, pool: bool = False) -> ReportFiles:
    """Write the HTML report (default OUT/report.html) and its Markdown twin (same name, .md, with
    figures in <name>_files/). ``reference``: the method(s) of the paired comparisons, one section each;
    default every ``map`` entry of the folder. Several folders are merged (:mod:`benchmarks.merge`: each
    row keeps its provenance; protocols are not pooled unless ``pool``); ``html_path`` is then required."""
    dirs = [Path(d) for d in ([out_dirs] if isinstance(out_dirs, str | Path) else out_dirs)]
    if html_path is None and len(dirs) > 1:
        raise ConfigError("-o: a report of several results folders needs an output file of its own; name it")
    html_path = Path(html_path) if html_path else dirs[0] / "report.html"
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"the report is HTML: give an output path ending in .html, not {html_path.name!r}")
    builder = ReportBuilder(dirs, reference, pool=pool)
    title, sections = builder.build()
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(title, sections))
    md_path = html_path.with_suffix(".md")
    md_path.write_text(render_markdown(title, sections, html_path.with_name(f"{html_path.stem}_files")))
    return ReportFiles(html_path, md_path, builder.notes)
