"""The report's matplotlib figures. Each function draws data computed in :mod:`benchmarks.analysis`
(or a path.csv table) and returns a Figure; :func:`png_bytes` encodes and closes it."""

from __future__ import annotations

import io
import math
import textwrap
from itertools import cycle

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: E402

DPI = 110
LABELS = {"mi": "MI", "entropy": "entropy"}
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*")
TITLE_WIDTH = 90


def wrapped(title: str, width: int = TITLE_WIDTH) -> str:
    """A title broken into lines of at most ``width`` characters, so long dataset names are never cut."""
    return "\n".join(textwrap.wrap(title, width)) or title


def styles(methods: list[str]) -> dict[str, dict[str, object]]:
    """A line style and marker per method (with its colour), so overlapping curves stay distinguishable."""
    pairs = cycle([(ls, mk) for mk in MARKERS for ls in LINESTYLES])
    return {m: {"linestyle": ls, "marker": mk} for m, (ls, mk) in zip(methods, pairs, strict=False)}


def same_as(curves: dict[str, np.ndarray]) -> dict[str, str]:
    """For each curve equal (to 1e-9) to an earlier one, that earlier method's name: drawn on top of each
    other, the legend says so instead of one line silently hiding the other."""
    out: dict[str, str] = {}
    seen: list[tuple[str, np.ndarray]] = []
    for method, values in curves.items():
        for other, earlier in seen:
            if earlier.shape == values.shape and np.allclose(earlier, values, atol=1e-9, equal_nan=True):
                out[method] = other
                break
        else:
            seen.append((method, values))
    return out


def legend_label(method: str, duplicates: dict[str, str]) -> str:
    return f"{method} (= {duplicates[method]})" if method in duplicates else method


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def method_colors(methods: list[str]) -> dict[str, tuple]:
    """One colour per method, the same in every figure of a report."""
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _grid(n_panels: int, n_cols: int, size: tuple[float, float]) -> tuple[Figure, list]:
    n_cols = min(n_cols, n_panels)
    n_rows = math.ceil(n_panels / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size[0] * n_cols, size[1] * n_rows), squeeze=False,
                             layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def reliability_figure(panels: dict[str, tuple[dict[str, torch.Tensor], float]], title: str) -> Figure:
    """One reliability diagram per method: accuracy per confidence bin (bars) against the diagonal, the
    gap between accuracy and mean confidence hatched (outline only, so nothing mixes colours), and the
    share of examples per bin as a step line. The legend sits below the panels, off every bar."""
    fig, axes = _grid(len(panels), 5, (2.6, 2.6))
    for ax, (method, (bins, ece)) in zip(axes, panels.items(), strict=True):
        edges = bins["edges"].numpy()
        width = edges[1] - edges[0]
        acc, conf, count = (bins[k][:-1].numpy() for k in ("accuracy", "confidence", "count"))
        left = edges[:-1]
        filled = count > 0
        ax.bar(left[filled], acc[filled], width=width, align="edge", color="tab:blue", edgecolor="white",
               label="accuracy")
        low, high = np.minimum(acc, conf)[filled], np.maximum(acc, conf)[filled]
        ax.bar(left[filled], high - low, bottom=low, width=width, align="edge", fill=False, edgecolor="tab:red",
               hatch="////", lw=0.6, label="gap to mean confidence")
        ax.stairs(count / max(count.sum(), 1), edges, color="dimgrey", lw=1.0, label="share of examples")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{method}\nECE {ece:.3f}")
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
    axes[0].set(xlabel="confidence", ylabel="accuracy")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=7)
    fig.suptitle(wrapped(title), fontsize=10)
    return fig


def uncertainty_histograms(rows: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
                           title: str, id_name: str, ood_name: str) -> Figure:
    """Per method (rows) and score (MI, entropy; columns): histograms of the in-distribution and
    OOD examples' scores, with the AUROC of the score for telling them apart."""
    scores = list(LABELS)
    fig, axes = plt.subplots(len(rows), 2, figsize=(7.0, 1.7 * len(rows)), squeeze=False, layout="constrained")
    for r, (method, per_score) in enumerate(rows.items()):
        for c, score in enumerate(scores):
            ax = axes[r][c]
            id_s, ood_s, auroc = per_score[score]
            both = torch.cat([id_s, ood_s])
            if len(both) == 0 or float(both.max()) <= 1e-12:
                why = "\n(one sample per prediction)" if score == "mi" else ""
                ax.text(0.5, 0.5, f"{LABELS[score]} = 0 for every example{why}", ha="center", va="center",
                        fontsize=8, transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                bins = torch.linspace(0, float(both.max()), 31).numpy()
                for values, name, kind in ((id_s, f"in distribution: {id_name}", "id"),
                                           (ood_s, f"out of distribution: {ood_name}", "ood")):
                    weights = torch.full_like(values, 1.0 / max(len(values), 1)).numpy()
                    if kind == "id":  # filled; OOD as an outline on top, so no colours mix
                        ax.hist(values.numpy(), bins=bins, weights=weights, color="tab:blue", alpha=0.45, label=name)
                    else:
                        ax.hist(values.numpy(), bins=bins, weights=weights, histtype="step", color="tab:orange",
                                lw=1.5, label=name)
            shown = "n/a" if math.isnan(auroc) else f"{auroc:.3f}"
            ax.set_title(f"{method}: {LABELS[score]} (AUROC {shown})", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=7)
            break
    axes[0][0].set_ylabel("share of examples", fontsize=8)
    axes[-1][0].set_xlabel("mutual information (nats)", fontsize=8)
    axes[-1][1].set_xlabel("predictive entropy (nats)", fontsize=8)
    fig.suptitle(wrapped(title, 80), fontsize=10)
    return fig


def coverage_figure(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], colors: dict[str, tuple],
                    title: str) -> Figure:
    """Selective prediction: accuracy on the most confident fraction of examples, per method. Methods
    with identical curves are named together in the legend; the legend sits below the axes."""
    fig, ax = plt.subplots(figsize=(7.0, 4.6), layout="constrained")
    duplicates = same_as({m: acc.numpy() for m, (_, acc) in curves.items()})
    style = styles(list(curves))
    for method, (coverage, acc) in curves.items():
        ax.plot(coverage.numpy(), acc.numpy(), label=legend_label(method, duplicates), color=colors.get(method),
                lw=1.4, linestyle=style[method]["linestyle"], marker=style[method]["marker"], ms=3,
                markevery=max(1, len(acc) // 8))
    ax.set(xlabel="coverage (fraction of examples answered, most confident first)", ylabel="accuracy", xlim=(0, 1))
    ax.grid(alpha=0.3)
    fig.suptitle(wrapped(title, 80), fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    return fig


def samples_figure(tables: dict[str, pd.DataFrame], colors: dict[str, tuple], title: str) -> Figure:
    """Accuracy, ECE and NLL against the number of posterior samples S, per sampling method. The x axis
    (log scale) is labelled at the sample counts evaluated, in plain numbers."""
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.6), layout="constrained")
    style = styles(list(tables))
    counts = sorted({int(s) for t in tables.values() for s in t["samples"]})
    for ax, metric in zip(axes, ("acc", "ece", "nll"), strict=True):
        duplicates = same_as({m: t[metric].to_numpy() for m, t in tables.items()})
        for method, table in tables.items():
            ax.plot(table["samples"], table[metric], ms=4, label=legend_label(method, duplicates),
                    color=colors.get(method), **style[method])
    for ax, metric in zip(axes, ("accuracy", "ECE", "NLL"), strict=True):
        ax.set(xscale="log", xlabel="samples S", title=metric)
        ax.xaxis.set_major_locator(FixedLocator(counts))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=7)
    fig.suptitle(wrapped(title, 120), fontsize=10)
    return fig


def path_figure(table: pd.DataFrame, title: str) -> Figure:
    """Loss and accuracy along each weight-space path (e.g. linear vs curve), per split."""
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.3), layout="constrained")
    styles = {"train": "-", "val": ":", "test": "--"}
    for (path, split), part in table.groupby(["path", "split"], sort=False):
        part = part.sort_values("t")
        for ax, col in zip(axes, ("loss", "acc"), strict=True):
            ax.plot(part["t"], part[col], styles.get(split, "-"), marker="o", ms=2.5, label=f"{path} / {split}")
    for ax, name in zip(axes, ("mean loss (NLL)", "accuracy"), strict=True):
        ax.set(xlabel="t", title=name)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(wrapped(title, 100), fontsize=10)
    return fig
