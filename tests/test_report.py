"""Leaderboard aggregation and formats, the paired comparison, the report's analyses, and the HTML
report itself (built from synthetic results folders, so no model is needed; one browser test)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from bayeslora import Predictive
from bayeslora.metrics import classification_metrics, expected_calibration_error, ood_metrics, reliability_bins
from benchmarks.analysis import coverage_curve, evenly_spaced, metrics_vs_samples, pooled_reliability, sample_subsets
from benchmarks.cli import main as cli_main
from benchmarks.leaderboard import aggregate, best_marks, display_table, leaderboard_latex
from benchmarks.pairwise import pairwise_table
from benchmarks.report import build_report
from benchmarks.store import write_manifest
from benchmarks.tables import latex_escape, to_latex

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


# -- a synthetic results folder, written the way the runner writes one -----------------------------------
def _logits(n: int, s: int, k: int, seed: int, sharp: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    base = torch.randn(n, 1, k, generator=g) + sharp * torch.nn.functional.one_hot(labels, k)[:, None]
    return base + 0.3 * torch.randn(n, s, k, generator=g), labels


def rid(name: str) -> str:
    """A run id (16 hex digits, as the runner names run folders) for a readable name."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def write_run(out: Path, name: str, method: str, seed: int, num_samples: int, dataset: str = "sst2",
              ood: tuple[str, ...] = (), n: int = 40, path_csv: bool = False, method_name: str | None = None) -> None:
    """A finished run folder (run id ``rid(name)``): predictive files and metrics.json rows computed from them."""
    run_id = rid(name)
    run = out / "runs" / run_id
    run.mkdir(parents=True)
    ids = [f"{dataset}-{i}" for i in range(n)]
    logits, labels = _logits(n, num_samples, 2, seed=zlib.crc32(f"{method}-{seed}".encode()))
    Predictive(logits, labels, ids).save(run / "predictive.pt")
    rows = []
    for eval_set in (dataset, *ood):
        row = {"model": "tiny", "method": method, "method_name": method_name or method, "dataset": dataset,
               "eval_set": eval_set, "split": "test", "seed": seed, "num_samples": num_samples, "n_examples": n,
               "fit_seconds": 1.5, "predict_seconds": 0.5, "peak_mem_mb": 100.0, "trainable_params": 64,
               "posterior_params": 0, "forward_passes": num_samples, "template": "t",
               "protocol": f"offline:{eval_set}", "n_bins": 15, "k_policy": "K=2", "suite": "synthetic",
               "run_id": run_id, "time_fit": 1.5, "time_predict": 0.5}
        pred_logits, pred_labels = logits, labels
        if eval_set != dataset:
            pred_logits, pred_labels = _logits(n, num_samples, 2, seed=seed + 100, sharp=0.2)
            Predictive(pred_logits, pred_labels, [f"{eval_set}-{i}" for i in range(n)]).save(
                run / f"predictive-{eval_set}.pt")
            row.update(ood_metrics(logits, pred_logits))
        row.update(classification_metrics(pred_logits, pred_labels))
        rows.append(row)
    (run / "metrics.json").write_text(json.dumps({"run_id": run_id, "rows": rows}))
    if path_csv:
        t = np.linspace(0, 1, 5)
        table = pd.concat([pd.DataFrame({"path": p, "t": t, "split": sp, "loss": 0.5 + h * np.sin(np.pi * t),
                                         "acc": 0.8 - h * np.sin(np.pi * t), "n_examples": n})
                           for p, h in (("linear", 0.2), ("curve", 0.02)) for sp in ("train", "test")])
        table.to_csv(run / "path.csv", index=False)


def synthetic_folder(out: Path, ood: tuple[str, ...] = ("boolq",), with_map: bool = True) -> Path:
    for seed in (0, 1, 2):
        if with_map:
            write_run(out, f"map{seed}", "map", seed, 1, ood=ood)
        write_run(out, f"mcd{seed}", "mc_dropout", seed, 6, ood=ood)
    write_run(out, "ens0", "ensemble", 0, 3, ood=ood, path_csv=True)
    return out


# -- aggregation and formats -----------------------------------------------------------------------------
def test_aggregate_matches_pandas_by_hand():
    rng = np.random.default_rng(0)
    rows = [{"model": "m", "dataset": "d", "eval_set": "d", "method": meth, "seed": s, "acc": rng.random(),
             "nll": rng.random(), "trainable_params": 10}
            for meth, seeds in (("a", [0, 1, 2]), ("b", [0, 1, 2, 3]), ("c", [0])) for s in seeds]
    df = pd.DataFrame(rows)
    agg = aggregate(df).set_index("method")
    for meth, part in df.groupby("method"):
        n = len(part)
        assert agg.loc[meth, "n_seeds"] == n
        assert agg.loc[meth, "acc_mean"] == pytest.approx(part.acc.sum() / n)
        by_hand_std = float(np.sqrt(((part.nll - part.nll.mean()) ** 2).sum() / (n - 1))) if n > 1 else 0.0
        assert agg.loc[meth, "nll_std"] == pytest.approx(by_hand_std)
        if n > 1:
            half = stats.t.ppf(0.975, n - 1) * by_hand_std / np.sqrt(n)
            assert agg.loc[meth, "nll_ci95"] == pytest.approx(half)
        else:
            assert np.isnan(agg.loc[meth, "nll_ci95"])
    # ranked by NLL within the group
    assert list(aggregate(df).method) == list(df.groupby("method").nll.mean().sort_values().index)


def test_best_marks_follow_each_metrics_direction_and_mark_ties():
    df = pd.DataFrame({"model": "m", "dataset": "d", "eval_set": "d", "method": ["a", "b", "c"], "seed": 0,
                       "acc": [0.7, 0.9, 0.9], "nll": [0.3, 0.5, 0.4], "mi": [0.1, 0.2, 0.3]})
    agg = aggregate(df)
    table = display_table(agg)
    marks = best_marks(agg, table)
    by_method = marks.set_index(table.method)
    assert by_method.acc.to_dict() == {"a": False, "b": True, "c": True}
    assert by_method.nll.to_dict() == {"a": True, "b": False, "c": False}
    assert not by_method.mi.any() and not by_method.method.any()


def _unescaped(text: str, char: str) -> int:
    return len(re.findall(rf"(?<!\\){re.escape(char)}", text))


def test_latex_is_a_compilable_table_fragment():
    table = pd.DataFrame({"method": ["lora_curve", "map & more", "50%"], "NLL ↓": ["0.4 ± 0.1", "0.5", "–"]})
    marks = pd.DataFrame({"method": [False] * 3, "NLL ↓": [True, False, False]})
    tex = to_latex(table, marks, caption="trained on sst2 · test", label="tab:x")
    assert tex.startswith("\\begin{table}") and tex.rstrip().endswith("\\end{table}")
    for env in ("table", "tabular"):
        assert tex.count(f"\\begin{{{env}}}") == tex.count(f"\\end{{{env}}}") == 1
    assert _unescaped(tex, "{") == _unescaped(tex, "}")
    body = tex[tex.index("\\toprule"):tex.index("\\bottomrule")]
    rows = [line for line in body.splitlines() if line.endswith("\\\\")]
    assert len(rows) == 1 + len(table)
    assert all(_unescaped(r, "&") == table.shape[1] - 1 for r in rows)
    assert "lora\\_curve" in tex and "map \\& more" in tex and "50\\%" in tex
    assert "\\textbf{0.4 $\\pm$ 0.1}" in tex and "$\\downarrow$" in tex and "$\\cdot$" in tex
    assert all(ord(c) < 128 for c in tex), "non-ASCII characters left in the LaTeX"
    assert latex_escape("a\\b") == "a\\textbackslash{}b"


def test_leaderboard_latex_and_cli_formats(tmp_path, capsys):
    out = synthetic_folder(tmp_path / "res")
    assert cli_main(["leaderboard", str(out), "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert tex.count("\\begin{table}") == 2  # sst2 (in distribution) and boolq (OOD)
    assert "OOD AUROC (MI) $\\uparrow$" in tex and "\\textbf{" in tex
    assert (out / "leaderboard.tex").read_text() == leaderboard_latex(_table(out), aggregate(_table(out)))
    assert tex.strip() == (out / "leaderboard.tex").read_text().strip()
    assert cli_main(["leaderboard", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("model,dataset,eval_set,method,n_seeds")
    assert cli_main(["leaderboard", str(out)]) == 0
    md = capsys.readouterr().out
    assert "Protocol: split test; N = 40 examples" in md and "**" in md


def _table(out: Path) -> pd.DataFrame:
    from benchmarks.store import results_table

    return results_table(out)


# -- paired comparison -------------------------------------------------------------------------------------
def test_pairwise_differences_and_tests_against_scipy(tmp_path):
    out = synthetic_folder(tmp_path)
    df = _table(out)
    from benchmarks.analysis import load_predictives

    preds, missing = load_predictives(out, df)
    assert not missing
    table = pairwise_table(df, preds).set_index(["eval_set", "method"])
    sst = df[df.eval_set == "sst2"]
    mcd = sst[sst.method == "mc_dropout"].set_index("seed").sort_index()
    ref = sst[sst.method == "map"].set_index("seed").sort_index()
    deltas = (mcd.nll - ref.nll).to_numpy()
    row = table.loc[("sst2", "mc_dropout")]
    assert row.n_pairs == 3
    assert row.delta_nll_mean == pytest.approx(deltas.mean()) and row.delta_nll_std == pytest.approx(deltas.std(ddof=1))
    assert row.p_seeds_nll == pytest.approx(stats.ttest_rel(mcd.nll, ref.nll).pvalue)
    # the example-level test: per-example NLL differences averaged over the seeds, Wilcoxon
    per_seed = []
    for s in (0, 1, 2):
        a = Predictive.load(out / "runs" / rid(f"mcd{s}") / "predictive.pt")
        b = Predictive.load(out / "runs" / rid(f"map{s}") / "predictive.pt")
        nll = lambda p: -torch.log(torch.softmax(p.logits.double(), -1).mean(1)[torch.arange(40), p.labels])
        per_seed.append((nll(a) - nll(b)).numpy())
    assert row.p_examples_nll == pytest.approx(stats.wilcoxon(np.mean(per_seed, axis=0)).pvalue)
    # the ensemble ran seed 0 only: one pair, no seed-level test, an example-level test all the same
    ens = table.loc[("sst2", "ensemble")]
    assert ens.n_pairs == 1 and np.isnan(ens.p_seeds_nll) and 0 <= ens.p_examples_nll <= 1


# -- analyses behind the figures -------------------------------------------------------------------------
def test_pooled_reliability_and_its_ece_match_the_metric():
    a, b = (Predictive(*_logits(50, 4, 3, seed), [str(i) for i in range(50)]) for seed in (1, 2))
    bins = pooled_reliability([a, b], 10)
    assert bins["count"].sum() == 100
    logits, labels = torch.cat([a.logits, b.logits]), torch.cat([a.labels, b.labels])
    p = torch.softmax(logits.double(), -1).mean(1)
    conf, pred = p.max(-1)
    assert torch.allclose(bins["count"], reliability_bins(conf, pred == labels, 10)["count"])
    nonempty = bins["count"] > 0
    ece = float((bins["count"][nonempty] / 100 * (bins["accuracy"] - bins["confidence"]).abs()[nonempty]).sum())
    assert ece == pytest.approx(expected_calibration_error(conf, pred == labels, 10))


def test_coverage_curve_on_a_hand_example():
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (right): accuracy at coverage 1/4..4/4
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    pred = Predictive(p.log()[:, None, :], torch.tensor([0, 0, 0, 1]), list("abcd"))
    coverage, acc = coverage_curve([pred, pred])
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert acc.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.75])


def test_metrics_vs_samples_uses_evenly_spaced_subsets():
    assert sample_subsets(10) == [1, 2, 3, 5, 10] and sample_subsets(3) == [1, 2, 3] and sample_subsets(1) == [1]
    assert evenly_spaced(10, 2).tolist() == [0, 9] and evenly_spaced(10, 10).tolist() == list(range(10))
    preds = [Predictive(*_logits(30, 10, 2, seed), [str(i) for i in range(30)]) for seed in (3, 4)]
    table = metrics_vs_samples(preds, 15).set_index("samples")
    full = [classification_metrics(p.logits, p.labels) for p in preds]
    assert table.loc[10, "nll"] == pytest.approx(np.mean([f["nll"] for f in full]))
    one = [classification_metrics(p.logits[:, :1], p.labels) for p in preds]
    assert table.loc[1, "ece"] == pytest.approx(np.mean([f["ece"] for f in one]))


# -- the report --------------------------------------------------------------------------------------------
def test_report_draws_every_section_from_a_complete_folder(tmp_path, capsys):
    out = synthetic_folder(tmp_path / "res")
    assert cli_main(["report", str(out), "-o", str(tmp_path / "r" / "report.html")]) == 0
    printed = capsys.readouterr()
    assert str(tmp_path / "r" / "report.html") in printed.out and "note:" not in printed.err
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Nothing is missing" in page
    for heading in ("Leaderboard", "Paired comparison with map", "Reliability diagrams", "Selective prediction",
                    "Metrics against the number of samples", "Out-of-distribution detection", "Weight-space paths",
                    "Where the time went", "The suite as run"):
        assert f">{heading}</h2>" in page, heading
    # self-contained: every image inline, nothing fetched
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 2 + 2 + 2 + 1 + 1  # reliability, coverage, samples for 2 sets; OOD; path
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("](report_files/") == len(images)
    assert len(list((tmp_path / "r" / "report_files").glob("*.png"))) == len(images)


def test_every_map_entry_gets_its_own_paired_comparison(tmp_path):
    out = synthetic_folder(tmp_path / "res", ood=())
    for seed in (0, 1, 2):
        write_run(out, f"long{seed}", "map-long", seed, 1, method_name="map")
    page = build_report(out).html.read_text()
    assert ">Paired comparison with map</h2>" in page and ">Paired comparison with map-long</h2>" in page
    only = build_report(out, tmp_path / "only.html", reference=["mc_dropout"]).html.read_text()
    assert ">Paired comparison with mc_dropout</h2>" in only and ">Paired comparison with map" not in only


def test_report_names_what_is_missing_instead_of_failing(tmp_path, capsys):
    out = synthetic_folder(tmp_path, ood=(), with_map=False)
    write_manifest(out, "synthetic", {rid(n): n for n in ["mcd0", "mcd1", "mcd2", "ens0", "lost-run"]})
    (out / "runs" / rid("ens0") / "path.csv").unlink()
    (out / "runs" / rid("mcd2") / "predictive.pt").unlink()
    files = build_report(out)
    assert files.html == out / "report.html" and files.html.exists() and files.markdown.exists()
    notes = " | ".join(files.notes)
    assert "1 of the suite's 5 runs have not finished" in notes and "lost-run" in notes
    assert "no map runs" in notes and "no OOD evaluation sets" in notes and "no run has path.csv" in notes
    assert "mc_dropout / sst2 / seed 2" in notes
    page = files.html.read_text()
    assert page.count('class="note"') >= 5 and "<img" in page
    assert cli_main(["report", str(out), "-o", str(tmp_path / "report.pdf")]) == 2
    assert "ending in .html" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "empty")]) == 2


def test_stale_runs_are_left_out_of_the_results(tmp_path):
    out = synthetic_folder(tmp_path, ood=())
    write_manifest(out, "synthetic", {rid(n): n for n in ["map0", "map1", "map2"]})
    assert set(_table(out).run_id) == {rid("map0"), rid("map1"), rid("map2")}
    assert (out / "runs" / rid("ens0") / "metrics.json").exists()  # kept on disk


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="no headless browser: install Debian's chromium and chromium-driver to run this test")
def test_report_renders_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    out = synthetic_folder(tmp_path / "res")
    files = build_report(out)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(files.html.as_uri())
        n_tables, n_images, decoded, widest = driver.execute_script(
            "const imgs = Array.from(document.images);"
            "return [document.querySelectorAll('table').length, imgs.length,"
            " imgs.filter(i => i.complete && i.naturalWidth > 0).length,"
            " Math.max(...imgs.map(i => i.getBoundingClientRect().width))];")
        assert n_tables >= 6 and n_images == 8 and decoded == n_images and widest > 200
        assert driver.title == "bayeslora report: synthetic"
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex not installed (Debian: texlive-latex-base texlive-latex-recommended)")
def test_leaderboard_latex_compiles_with_pdflatex(tmp_path):
    import subprocess

    out = synthetic_folder(tmp_path / "res")
    tex = leaderboard_latex(_table(out), aggregate(_table(out)))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
                                      "\\begin{document}\n" + tex + "\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


# -- several folders merged ------------------------------------------------------------------------------
def _set_rows(run_dir: Path, **values) -> None:
    meta = json.loads((run_dir / "metrics.json").read_text())
    for row in meta["rows"]:
        row.update(values)
    (run_dir / "metrics.json").write_text(json.dumps(meta))


def two_folders(tmp_path: Path, same_protocol: bool) -> tuple[Path, Path]:
    """Folder a (this machine: map seeds 0-1, mc_dropout) and b (another: map seed 2, ensemble)."""
    a, b = tmp_path / "lab-a" / "results", tmp_path / "lab-b" / "results"
    for seed in (0, 1):
        write_run(a, f"map{seed}", "map", seed, 1)
        write_run(a, f"mcd{seed}", "mc_dropout", seed, 4)
    write_run(b, "map2", "map", 2, 1)
    write_run(b, "ens0", "ensemble", 0, 3)
    for folder, hardware, protocol in ((a, "CPU (x86_64), 2 cores", "p1"),
                                       (b, "1 x NVIDIA H200", "p1" if same_protocol else "p2")):
        for run in (folder / "runs").iterdir():
            _set_rows(run, hardware=hardware, protocol_id=protocol, code_version=f"bayeslora {folder.parent.name}")
    return a, b


def test_merged_leaderboard_pools_one_protocol_and_keeps_provenance(tmp_path):
    from benchmarks.merge import merged_results

    a, b = two_folders(tmp_path, same_protocol=True)
    df = merged_results([a, b])
    assert set(df.source) == {"lab-a/results", "lab-b/results"}  # clashing names get their parent's
    maps = df[df.method == "map"]
    assert sorted(maps.seed) == [0, 1, 2] and set(maps.hardware) == {"CPU (x86_64), 2 cores", "1 x NVIDIA H200"}
    assert cli_main(["leaderboard", str(a), str(b), "--out", str(tmp_path / "merged")]) == 0
    board = pd.read_csv(tmp_path / "merged" / "leaderboard.csv").set_index("method")
    # pooled over the three seeds of two folders: the mean of all three, by hand
    assert board.loc["map", "n_seeds"] == 3
    assert board.loc["map", "acc_mean"] == pytest.approx(maps.acc.mean())
    assert board.loc["map", "sources"] == "lab-a/results, lab-b/results"
    markdown = (tmp_path / "merged" / "leaderboard.md").read_text()
    assert "## Provenance" in markdown and "1 x NVIDIA H200" in markdown and "bayeslora lab-b" in markdown


def test_merged_folders_with_different_protocols_are_not_pooled_unless_asked(tmp_path):
    from benchmarks.merge import merged_results

    a, b = two_folders(tmp_path, same_protocol=False)
    methods = set(merged_results([a, b]).method)
    assert {"map @ lab-a/results", "map @ lab-b/results", "mc_dropout", "ensemble"} == methods
    pooled = merged_results([a, b], pool=True)
    assert sorted(pooled[pooled.method == "map"].seed) == [0, 1, 2]
    assert cli_main(["leaderboard", str(a), str(b)]) == 2  # several folders need --out
    files = build_report([a, b], tmp_path / "merged.html")
    markdown = files.markdown.read_text()
    assert "map @ lab-a/results" in markdown and "map @ lab-b/results" in markdown
    assert "The suites as run" in markdown and "1 x NVIDIA H200" in markdown
    assert "lab-b/results" in files.html.read_text()


def test_the_same_run_in_two_folders_counts_once(tmp_path):
    from benchmarks.merge import merged_results

    a = synthetic_folder(tmp_path / "a")
    shutil.copytree(a, tmp_path / "copy")
    df = merged_results([a, tmp_path / "copy"])
    assert len(df) == len(merged_results([a]))


def test_a_pipe_inside_a_markdown_cell_is_escaped():
    from benchmarks.tables import to_markdown

    lines = to_markdown(pd.DataFrame({"a": ["|x| = 1"], "b": [2]})).splitlines()
    assert lines[2] == "| \\|x\\| = 1 | 2 |" and lines[2].replace("\\|", "").count("|") == 3


# -- figures ---------------------------------------------------------------------------------------------
def _samples_table(counts: list[int], offset: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame({"samples": counts, "acc": [0.8 + offset] * len(counts), "ece": [0.1] * len(counts),
                         "nll": [0.4] * len(counts)})


@pytest.mark.parametrize("num_samples, labels", [(4, ["1", "2", "3", "4"]), (10, ["1", "2", "3", "5", "10"])])
def test_samples_axis_is_labelled_at_the_counts_in_plain_numbers(num_samples, labels):
    from benchmarks import figures

    counts = sample_subsets(num_samples)
    fig = figures.samples_figure({"a": _samples_table(counts), "b": _samples_table(counts, 0.01)},
                                 {"a": "C0", "b": "C1"}, "title")
    fig.canvas.draw()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert not ax.xaxis.get_minor_ticks() or not any(t.get_text() for t in ax.get_xminorticklabels())
    figures.png_bytes(fig)


def test_legends_sit_off_the_axes_and_name_identical_curves():
    from benchmarks import figures

    coverage = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    curves = {"map": (coverage, 1 - 0.1 * coverage), "temperature": (coverage, 1 - 0.1 * coverage),
              "laplace_lora-6ep-valnll-with-a-long-label": (coverage, 1 - 0.2 * coverage)}
    title = "Qwen/Qwen2.5-7B-Instruct · trained on mmlu_college_chemistry · evaluated on mmlu_college_physics " * 2
    fig = figures.coverage_figure(curves, figures.method_colors(list(curves)), title)
    fig.canvas.draw()
    (legend,) = fig.legends
    assert "temperature (= map)" in [t.get_text() for t in legend.get_texts()]
    renderer = fig.canvas.get_renderer()
    box, axes_box = legend.get_window_extent(renderer), fig.axes[0].get_window_extent(renderer)
    assert box.y1 <= axes_box.y0  # below the axes, covering nothing
    suptitle = fig._suptitle
    assert "\n" in suptitle.get_text() and suptitle.get_window_extent(renderer).x1 <= fig.bbox.x1
    figures.png_bytes(fig)


def test_reliability_legend_names_every_mark_and_covers_no_bar():
    from benchmarks import figures

    conf = torch.rand(200, generator=torch.Generator().manual_seed(0)).double() * 0.5 + 0.5
    bins = reliability_bins(conf, conf > 0.7)
    fig = figures.reliability_figure({"map": (bins, 0.1), "laplace": (bins, 0.1)}, "title")
    fig.canvas.draw()
    (legend,) = fig.legends
    assert {t.get_text() for t in legend.get_texts()} == {"accuracy", "gap to mean confidence", "share of examples",
                                                          "perfect calibration"}
    renderer = fig.canvas.get_renderer()
    assert all(not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in fig.axes
               if ax.get_visible())
    figures.png_bytes(fig)
