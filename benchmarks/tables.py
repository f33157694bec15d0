"""One table of display strings, three renderings: Markdown, LaTeX (booktabs) and HTML.

A cell can be marked (the best value of its column); each format shows the mark its own way:
``**x**`` in Markdown, ``\\textbf{x}`` in LaTeX, ``<b>x</b>`` in HTML.
"""

from __future__ import annotations

import html

import pandas as pd

LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}

LATEX_SYMBOLS = {"±": r"$\pm$", "–": "--", "†": r"$^\dagger$", "·": r"$\cdot$", "↑": r"$\uparrow$",
                 "↓": r"$\downarrow$", "Δ": r"$\Delta$", "≤": r"$\leq$", "≥": r"$\geq$", "−": "-"}


def _marks(table: pd.DataFrame, marked: pd.DataFrame | None) -> pd.DataFrame:
    if marked is None:
        return pd.DataFrame(False, index=table.index, columns=table.columns)
    if list(marked.columns) != list(table.columns) or len(marked) != len(table):
        raise ValueError("the mark mask must have the table's shape and columns")
    return marked.fillna(False).astype(bool)


def to_markdown(table: pd.DataFrame, marked: pd.DataFrame | None = None) -> str:
    """A GitHub-flavoured Markdown table; marked cells in bold; a "|" inside a cell is escaped."""
    marks = _marks(table, marked)
    text = lambda v: str(v).replace("|", "\\|")
    cell = lambda v, b: f"**{text(v)}**" if b else text(v)
    header = "| " + " | ".join(text(c) for c in table.columns) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v, b) for v, b in zip(row, mrow, strict=True)) + " |"
            for row, mrow in zip(table.itertuples(index=False), marks.itertuples(index=False), strict=True)]
    return "\n".join([header, sep, *body]) + "\n"


def latex_escape(text: object) -> str:
    """Text with LaTeX's special characters escaped; ±, †, ·, ↑, ↓, Δ and – become math or ASCII equivalents."""
    return "".join(LATEX_SPECIALS.get(ch, LATEX_SYMBOLS.get(ch, ch)) for ch in str(text))


def to_latex(table: pd.DataFrame, marked: pd.DataFrame | None = None, caption: str = "", label: str = "") -> str:
    """A booktabs ``table`` environment (needs ``booktabs`` and ``graphicx``), scaled to the line width:
    first column left-aligned, the others right-aligned; marked cells in bold."""
    marks = _marks(table, marked)
    cell = lambda v, b: rf"\textbf{{{latex_escape(v)}}}" if b else latex_escape(v)
    spec = "l" + "r" * (len(table.columns) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\resizebox{\linewidth}{!}{%",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    for row, mrow in zip(table.itertuples(index=False), marks.itertuples(index=False), strict=True):
        lines.append(" & ".join(cell(v, b) for v, b in zip(row, mrow, strict=True)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame, marked: pd.DataFrame | None = None, css_class: str = "board") -> str:
    """An HTML ``<table>``; values escaped, marked cells in ``<b>``."""
    marks = _marks(table, marked)
    cell = lambda v, b: f"<td><b>{html.escape(str(v))}</b></td>" if b else f"<td>{html.escape(str(v))}</td>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(cell(v, b) for v, b in zip(row, mrow, strict=True)) + "</tr>\n"
                   for row, mrow in zip(table.itertuples(index=False), marks.itertuples(index=False), strict=True))
    return f'<table class="{css_class}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n'
