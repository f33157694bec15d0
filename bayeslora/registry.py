"""Method registry: ``@register("name")`` in-process, or the ``bayeslora.methods`` entry-point group.

Built-in baselines are declared through the same entry-point group in this project's pyproject,
so the core never imports them and a third-party plugin is registered exactly like they are.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from .errors import ConfigError, UnknownMethodError
from .posterior import Posterior

ENTRY_POINT_GROUP = "bayeslora.methods"

_REGISTRY: dict[str, type[Posterior]] = {}
_entry_points_loaded = False


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


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Posterior)):
            raise ConfigError(f"entry point {ep.name!r} ({ep.value}) in {ENTRY_POINT_GROUP} is not a Posterior")
        if cls.name and cls.name != ep.name:
            raise ConfigError(f"entry point {ep.name!r} points at {ep.value}, whose name is {cls.name!r}; "
                              "make the two agree")
        cls.name = ep.name
        _REGISTRY[ep.name] = cls


def reload_entry_points() -> None:
    """Re-scan installed distributions (after installing a plugin in a running process)."""
    global _entry_points_loaded
    _entry_points_loaded = False
    _load_entry_points()


def available_methods() -> dict[str, type[Posterior]]:
    """All registered methods, name -> class, sorted by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[Posterior]:
    """The class registered as ``name``; an unknown name fails with the list of known ones."""
    methods = available_methods()
    if name not in methods:
        known = ", ".join(methods) or "(none)"
        raise UnknownMethodError(
            f"unknown method {name!r}. Registered methods: {known}. "
            f"Register new ones with @bayeslora.register or the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return methods[name]
