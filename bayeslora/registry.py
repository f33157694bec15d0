"""Method registry: ``@register("name")`` in-process, or the ``bayeslora.methods`` entry-point group.

Built-in baselines are declared through the same entry-point group in this project's pyproject,
so the core never imports them and a third-party plugin is registered exactly like they are.

Lookups are lazy: the entry points' names are read from the installed distributions' metadata
without importing anything, and a method's module is imported only when that method is asked for
(:func:`get_method`). So listing methods or looking up ``map`` does not import pyro or vbll, and a
plugin that fails to import breaks only its own methods, with an error naming the plugin.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from .errors import ConfigError, UnknownMethodError
from .posterior import Posterior

ENTRY_POINT_GROUP = "bayeslora.methods"

_REGISTRY: dict[str, type[Posterior]] = {}
_entry_points: dict[str, EntryPoint] | None = None


def register(name: str) -> Callable[[type[Posterior]], type[Posterior]]:
    """Class decorator adding a :class:`Posterior` subclass to the registry under ``name``."""

    def decorate(cls: type[Posterior]) -> type[Posterior]:
        if not (isinstance(cls, type) and issubclass(cls, Posterior)):
            raise TypeError(f"@register({name!r}) must decorate a Posterior subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ConfigError(f"method name {name!r} is already registered by {existing.__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _scan() -> dict[str, EntryPoint]:
    """The group's entry points by name (metadata only: nothing is imported)."""
    global _entry_points
    if _entry_points is None:
        _entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points


def reload_entry_points() -> None:
    """Re-scan installed distributions (after installing a plugin in a running process)."""
    global _entry_points
    _entry_points = None
    _scan()


def method_names() -> list[str]:
    """Every registered method name, sorted, without importing any method."""
    return sorted(set(_REGISTRY) | set(_scan()))


def _origin(ep: EntryPoint) -> str:
    dist = f" (distribution {ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
    return f"{ep.value}{dist}"


def _load(name: str, ep: EntryPoint) -> type[Posterior]:
    try:
        cls = ep.load()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the other methods down
        raise ConfigError(f"method {name!r} comes from the plugin {_origin(ep)}, which fails to import "
                          f"({type(exc).__name__}: {exc}); fix or uninstall that plugin") from exc
    if not (isinstance(cls, type) and issubclass(cls, Posterior)):
        raise ConfigError(f"entry point {name!r} ({ep.value}) in {ENTRY_POINT_GROUP} is not a Posterior")
    if cls.name and cls.name != name:
        raise ConfigError(f"entry point {name!r} points at {ep.value}, whose name is {cls.name!r}; "
                          "make the two agree")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def get_method(name: str) -> type[Posterior]:
    """The class registered as ``name`` (its module imported now if it comes from an entry point); an
    unknown name fails with the list of known ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    ep = _scan().get(name)
    if ep is None:
        known = ", ".join(method_names()) or "(none)"
        raise UnknownMethodError(
            f"unknown method {name!r}. Registered methods: {known}. "
            f"Register new ones with @bayeslora.register or the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return _load(name, ep)


def available_methods() -> dict[str, type[Posterior]]:
    """All registered methods, name -> class, sorted by name. This imports every method's module (and a
    broken plugin raises); :func:`method_summaries` lists them without importing."""
    return {name: get_method(name) for name in method_names()}


def method_summaries() -> dict[str, tuple[str, str]]:
    """name -> (one-line description, module), read without importing methods that are not loaded yet:
    a class's ``description`` (or docstring's first line) is taken from its module's source."""
    out = {}
    for name in method_names():
        if name in _REGISTRY:
            cls = _REGISTRY[name]
            out[name] = (cls.description or (cls.__doc__ or "").strip().split("\n")[0], cls.__module__)
        else:
            ep = _scan()[name]
            module, _, attr = ep.value.partition(":")
            out[name] = (_static_description(module.strip(), attr.strip()), module.strip())
    return out


def _static_description(module: str, attr: str) -> str:
    """The ``description`` string (or the docstring's first line) of class ``attr`` in ``module``'s source."""
    try:
        spec = importlib.util.find_spec(module)
        source = open(spec.origin, encoding="utf-8").read() if spec is not None and spec.origin else ""
        tree = ast.parse(source)
    except (ImportError, OSError, SyntaxError, ValueError):
        return "(its module cannot be read)"
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "description"
                                                        for t in stmt.targets) \
                        and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    return stmt.value.value
            return (ast.get_docstring(node) or "").split("\n")[0]
    return ""
