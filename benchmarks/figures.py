"""The report's matplotlib figures. Each function draws data computed in :mod:`benchmarks.analysis`
(or a path.csv table) and returns a Figure; :func:`png_bytes` encodes and closes it."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 110
LABELS = {"mi": "MI", "entropy": "entropy"}


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
    """One reliability diagram per method: accuracy per confidence bin against the diagonal, bar
    widths the bins, the gap to the diagonal shaded; the bin counts as a faint histogram."""
    fig, axes = _grid(len(panels), 5, (2.6, 2.6))
    for ax, (method, (bins, ece)) in zip(axes, panels.items(), strict=True):
        edges = bins["edges"].numpy()
        width = edges[1] - edges[0]
        acc, conf, count = (bins[k][:-1].numpy() for k in ("accuracy", "confidence", "count"))
        left = edges[:-1]
        filled = count > 0
        ax.bar(left[filled], acc[filled], width=width, align="edge", color="tab:blue", edgecolor="white",
               label="accuracy")
        ax.bar(left[filled], (conf - acc)[filled], bottom=acc[filled], width=width, align="edge",
               color="tab:red", alpha=0.3, label="gap")
        share = count / max(count.sum(), 1)
        ax.bar(left, share, width=width, align="edge", color="grey", alpha=0.35, label="share of examples")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{method}\nECE {ece:.3f}")
        ax.title.set_fontsize(9)
        ax.tick_params(labelsize=7)
    axes[0].set(xlabel="confidence", ylabel="accuracy")
    axes[0].legend(fontsize=6, loc="upper left")
    fig.suptitle(title, fontsize=10)
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
                for values, name, color in ((id_s, id_name, "tab:blue"), (ood_s, ood_name, "tab:orange")):
                    weights = torch.full_like(values, 1.0 / max(len(values), 1)).numpy()
                    ax.hist(values.numpy(), bins=bins, weights=weights, alpha=0.55, label=name, color=color)
            ax.set_title(f"{method}: {LABELS[score]} (AUROC {auroc:.3f})", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    axes[0][0].set_ylabel("share of examples", fontsize=8)
    axes[-1][0].set_xlabel("mutual information (nats)", fontsize=8)
    axes[-1][1].set_xlabel("predictive entropy (nats)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def coverage_figure(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], colors: dict[str, tuple],
                    title: str) -> Figure:
    """Selective prediction: accuracy on the most confident fraction of examples, per method."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    for method, (coverage, acc) in curves.items():
        ax.plot(coverage.numpy(), acc.numpy(), label=method, color=colors.get(method), lw=1.4)
    ax.set(xlabel="coverage (fraction of examples answered, most confident first)", ylabel="accuracy",
           xlim=(0, 1), title=title)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    return fig


def samples_figure(tables: dict[str, pd.DataFrame], colors: dict[str, tuple], title: str) -> Figure:
    """Accuracy, ECE and NLL against the number of posterior samples S, per sampling method."""
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 3.3), layout="constrained")
    for method, table in tables.items():
        for ax, metric in zip(axes, ("acc", "ece", "nll"), strict=True):
            ax.plot(table["samples"], table[metric], marker="o", ms=3, label=method, color=colors.get(method))
    for ax, metric in zip(axes, ("accuracy", "ECE", "NLL"), strict=True):
        ax.set(xscale="log", xlabel="samples S", title=metric)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.suptitle(title, fontsize=10)
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
    fig.suptitle(title, fontsize=10)
    return fig
