"""What a run's numbers depend on besides its settings: the code, the model's weights and the data.

Each function returns plain data that enters a run id (and the keys of the cached artifacts), so that
changing any of them makes exactly the affected runs execute again:

- :func:`method_code`: the distribution that provides a method (name, version) and a digest of the
  source of the method's module and of every module it imports, transitively, from its own top-level
  package and from ``bayeslora`` (docstrings and comments excluded: editing them changes nothing).
- :func:`evaluation_code`: bayeslora's version and the digest of the metrics code.
- :func:`model_identity`: a local model folder (or the bundled one) by the sha256 of its files; a hub
  model by id and pinned ``revision`` (unpinned: the hub id alone, and a warning).
- :func:`data_identity`: local data files and the bundled copies by sha256; hub data by id, config
  and ``data.revision``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import logging
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .files import file_digest

if TYPE_CHECKING:
    from .config import DataSettings, ModelSettings
    from .data.tasks import TaskSpec

log = logging.getLogger(__name__)

CORE_PACKAGE = "bayeslora"


# ------------------------------------------------------------------------------------------- code
def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Drop every bare string statement (module, class and function docstrings, field docstrings): they
    do nothing, so editing them must not change a digest."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and isinstance(s.value.value, str))]
            node.body = kept or [ast.Pass()]
    return tree


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module ``import`` / ``from ... import`` statement in ``tree`` may refer to
    (including imports inside functions)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # a submodule import runs its parent packages' __init__ too
    return {".".join(n.split(".")[: i + 1]) for n in names if n for i in range(n.count(".") + 1)}


@functools.cache
def source_digest(module: str, packages: tuple[str, ...] = (CORE_PACKAGE,)) -> str:
    """sha256 over the docstring-free syntax trees of ``module`` and of every module it imports,
    transitively, from the top-level ``packages``."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        seen[name] = ast.dump(_strip_docstrings(tree))
        for child in _imported_names(tree, name, path.name == "__init__.py"):
            if child.split(".")[0] in packages and child not in seen:
                todo.append(child)
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(f"{name}\n{seen[name]}\n".encode())
    return h.hexdigest()[:16]


def package_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _method_distribution(name: str, module: str) -> tuple[str, str]:
    """(distribution, version) of the entry point registering ``name``; an in-process registration
    (``@register``) is named by its top-level package, unversioned."""
    for ep in entry_points(group="bayeslora.methods", name=name):
        if ep.dist is not None:
            return ep.dist.name, ep.dist.version
    return module.split(".")[0], "unversioned"


def method_code(cls: type) -> dict[str, str]:
    """The code a method's numbers come from: its distribution, version and source digest."""
    top = cls.__module__.split(".")[0]
    distribution, dist_version = _method_distribution(getattr(cls, "name", ""), cls.__module__)
    return {"distribution": distribution, "version": dist_version,
            "source": source_digest(cls.__module__, tuple(sorted({top, CORE_PACKAGE})))}


def evaluation_code() -> dict[str, str]:
    """bayeslora's version and the digest of the metrics every row is computed with."""
    return {"bayeslora": package_version(CORE_PACKAGE), "metrics": source_digest("bayeslora.metrics")}


def code_version() -> str:
    """A short label for results rows: ``bayeslora <version>``."""
    return f"bayeslora {package_version(CORE_PACKAGE)}"


# ------------------------------------------------------------------------------------------ model
def model_identity(settings: ModelSettings) -> dict[str, Any]:
    """What the model's weights and tokenizer are: file digests of a local folder (the bundled model
    included), or the hub id with its pinned revision. Call after :func:`check_model_source`."""
    from .model_source import resolve_model_path

    if settings.random_init is not None:
        tokenizer = settings.random_init.get("tokenizer", "smollm2-135m")
        return {"random_init": True, "tokenizer": _source_identity(resolve_model_path(tokenizer), None)}
    return _source_identity(resolve_model_path(settings.name), settings.revision)


_warned_unpinned: set[str] = set()


def _source_identity(path: str, revision: str | None) -> dict[str, Any]:
    local = Path(path)
    if local.is_dir():
        return {"files": file_digest(local)}
    if revision is None and path not in _warned_unpinned:
        _warned_unpinned.add(path)
        log.warning("model %s has no pinned revision (model.revision): its run ids cannot notice a new "
                    "upload on the hub; pin a commit for reproducible results", path)
    return {"hub": path, "revision": revision}


# ------------------------------------------------------------------------------------------- data
def data_identity(task: TaskSpec, settings: DataSettings) -> dict[str, Any]:
    """The content of the data a task reads under ``settings`` (see :mod:`bayeslora.data.sources`)."""
    if settings.source == "files":
        return {"files": {split: _local_data_digest(path) for split, path in sorted((settings.files or {}).items())}}
    if settings.source == "hub":
        return {"hub": [task.hub[0], task.hub[1]], "revision": settings.revision}
    from .assets import ensure_data
    from .data.sources import offline_paths

    root = ensure_data()
    return {"offline": {str(p.relative_to(root)): file_digest(p) for p in offline_paths(task, root)}}


def _local_data_digest(path: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.files: {p} does not exist; give the path of a jsonl/json/parquet/arrow/csv file "
                          f"or a datasets save-to-disk folder")
    return file_digest(p)
