"""Render a report's sections as one self-contained HTML page (figures inlined as base64 PNG, no
scripts, no external files) and as a Markdown twin whose figures sit in a folder beside it."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .tables import to_html, to_markdown


def slugify(*parts: object) -> str:
    """Lower-case words joined by '-': an HTML id or a file name."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")


@dataclass
class Text:
    text: str


@dataclass
class Note:
    """Something the reader must know: a missing method, a skipped plot."""

    text: str


@dataclass
class Table:
    table: pd.DataFrame
    marks: pd.DataFrame | None = None
    caption: str = ""


@dataclass
class Figure:
    slug: str
    png: bytes
    caption: str


@dataclass
class Code:
    text: str


Block = Text | Note | Table | Figure | Code


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2

    @property
    def anchor(self) -> str:
        return slugify(self.title)


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #1b1b1b; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-top: 1.5em; }
.scroll { overflow-x: auto; }
table.board { border-collapse: collapse; font-size: 12.5px; margin: .5em 0 1em; }
table.board th, table.board td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right;
                                 white-space: nowrap; }
table.board th:first-child, table.board td:first-child { text-align: left; }
table.board thead th { border-bottom: 2px solid #555; }
table.board b { color: #0b5394; }
p.note { background: #fff6e0; border-left: 4px solid #e6a700; padding: .4em .8em; }
p.caption { font-size: 13px; color: #444; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; }
pre { background: #f6f6f6; padding: .8em; font-size: 12px; overflow-x: auto; }
nav ul { columns: 2; font-size: 14px; }
"""


def _html_block(block: Block) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>\n"
    if isinstance(block, Note):
        return f'<p class="note">{html.escape(block.text)}</p>\n'
    if isinstance(block, Table):
        caption = f'<p class="caption">{html.escape(block.caption)}</p>\n' if block.caption else ""
        return caption + f'<div class="scroll">{to_html(block.table, block.marks)}</div>\n'
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        alt = html.escape(block.caption)
        return (f'<figure id="fig-{block.slug}"><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption class=\"caption\">{alt}</figcaption></figure>\n")
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>\n"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(title: str, sections: list[Section]) -> str:
    """The whole page: a table of contents, then every section."""
    toc = "".join(f'<li><a href="#{s.anchor}">{html.escape(s.title)}</a></li>' for s in sections if s.level == 2)
    body = []
    for s in sections:
        body.append(f'<h{s.level} id="{s.anchor}">{html.escape(s.title)}</h{s.level}>\n')
        body.extend(_html_block(b) for b in s.blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<nav><ul>{toc}</ul></nav>\n{''.join(body)}</body>\n</html>\n")


def render_markdown(title: str, sections: list[Section], figure_dir: Path) -> str:
    """The same content in Markdown; figures are written into ``figure_dir`` and linked relatively."""
    figure_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}\n"]
    for s in sections:
        lines.append(f"\n{'#' * s.level} {s.title}\n")
        for block in s.blocks:
            if isinstance(block, Text):
                lines.append(block.text + "\n")
            elif isinstance(block, Note):
                lines.append(f"> **Note.** {block.text}\n")
            elif isinstance(block, Table):
                lines.append((f"{block.caption}\n\n" if block.caption else "") + to_markdown(block.table, block.marks))
            elif isinstance(block, Figure):
                (figure_dir / f"{block.slug}.png").write_bytes(block.png)
                lines.append(f"![{block.caption}]({figure_dir.name}/{block.slug}.png)\n\n*{block.caption}*\n")
            elif isinstance(block, Code):
                lines.append(f"```yaml\n{block.text.rstrip()}\n```\n")
    return "\n".join(lines)
