"""The README and docs/ point at what exists: every relative link resolves to a file (and heading), every
document a docstring names is in the repository, and nothing cites documents outside it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_DIRS = ("bayeslora", "baselines", "benchmarks", "configs", "tests")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_the_four_docs_exist_and_the_readme_is_short():
    assert {p.name for p in DOCS} >= {"README.md", "methods.md", "benchmarking.md", "extending.md", "scaling.md"}
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_documents_named_in_the_code_exist():
    named = set()
    for folder in CODE_DIRS:
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".yaml"):
                named |= set(re.findall(r"\b((?:docs|benchmarks)/[\w.-]+\.md)\b", path.read_text()))
    assert named, "the code names no document: the pattern is wrong"
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, missing


def test_nothing_cites_documents_outside_the_repository():
    citing = [str(p.relative_to(REPO)) for folder in CODE_DIRS for p in (REPO / folder).rglob("*")
              if p.suffix in (".py", ".yaml", ".md") and p.name != "test_docs.py"
              and re.search(r"METHODS\.md|shared/docs", p.read_text())]
    citing += [p.name for p in DOCS if re.search(r"METHODS\.md|shared/docs", p.read_text())]
    assert not citing, citing


def settings_classes() -> set[type]:
    """The core settings, every registered method's Config, and the settings dataclasses nested in them."""
    import dataclasses
    import typing

    from bayeslora import available_methods
    from bayeslora.config import DataSettings, LoraSettings, ModelSettings, TrainSettings
    from bayeslora.paths import PathSettings

    todo = [ModelSettings, LoraSettings, TrainSettings, DataSettings, PathSettings,
            *(cls.Config for cls in available_methods().values())]
    found: set[type] = set()
    while todo:
        cls = todo.pop()
        for klass in cls.__mro__:
            if dataclasses.is_dataclass(klass) and klass.__module__.split(".")[0] in ("bayeslora", "baselines") \
                    and klass not in found:
                found.add(klass)
                for hint in typing.get_type_hints(klass).values():
                    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                        todo.append(hint)
    return found


def test_every_settings_field_has_a_one_line_docstring():
    import ast
    import inspect

    undocumented = []
    for cls in settings_classes():
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for stmt, nxt in zip(body, [*body[1:], None], strict=True):
            if isinstance(stmt, ast.AnnAssign) and "ClassVar" not in ast.unparse(stmt.annotation):
                documented = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str)
                if not documented:
                    undocumented.append(f"{cls.__name__}.{ast.unparse(stmt.target)}")
    assert len(settings_classes()) > 15 and not undocumented, undocumented
