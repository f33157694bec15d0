"""Per-phase wall-clock profile of a run (load, tokenise, trunk, train, fit, predict, ...).

Phases nest; each phase is charged its *exclusive* time (time inside a nested phase is charged to
the nested one only), so the phases of a run add up to its wall time. The active profile is held in
a context variable: library code marks phases with ``with phase("trunk"):`` and pays nothing when
no profile is recording.

Separately, work that fills a cache shared by runs (trunk states, MAP-adapter features, trained MAP
adapters) is marked with ``with filling_cache("trunk"):``; its time is charged to that cache, exclusively
as phases are (trunk states computed while a MAP adapter trains count as trunk), and the runner
subtracts it from the fit and predict seconds of whichever run happened to fill it.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

PHASES = ("load", "tokenise", "trunk", "features", "train", "fit", "predict", "path", "metrics")
"""The phases the runner and the library report, in display order."""
CACHES = ("trunk", "features", "map_adapter")
"""The shared caches whose filling is charged to themselves (``cache_<name>_seconds`` result columns)."""


class ExclusiveClock:
    """Exclusive seconds per name for nested blocks: time inside a nested block is charged to it only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float, list[float]]] = []  # (name, time it last resumed, its own seconds)

    def _charge(self, until: float) -> None:
        name, resumed, own = self._stack[-1]
        self.seconds[name] += until - resumed
        own[0] += until - resumed

    @contextlib.contextmanager
    def block(self, name: str) -> Iterator[list[float]]:
        """Charge the block to ``name``; yields [the seconds it was charged], set when it ends."""
        now = time.perf_counter()
        if self._stack:  # pause the enclosing block
            self._charge(now)
        own = [0.0]
        self._stack.append((name, now, own))
        try:
            yield own
        finally:
            end = time.perf_counter()
            self._charge(end)
            self._stack.pop()
            if self._stack:  # resume the enclosing block
                outer, _, outer_own = self._stack[-1]
                self._stack[-1] = (outer, end, outer_own)


class PhaseProfile:
    """Exclusive seconds per phase name, and (separately) per shared cache filled."""

    def __init__(self) -> None:
        self._phases, self._fills = ExclusiveClock(), ExclusiveClock()
        self.seconds: dict[str, float] = self._phases.seconds
        self.cache_seconds: dict[str, float] = self._fills.seconds
        self.shared_training_seconds = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._phases.block(name):
            yield

    def filling(self, cache: str) -> contextlib.AbstractContextManager[list[float]]:
        """Charge the block to ``cache``, nested fills excluded; yields [seconds charged], set at the end."""
        return self._fills.block(cache)

    def cache_total(self) -> float:
        return sum(self.cache_seconds.values())

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


_ACTIVE: ContextVar[PhaseProfile | None] = ContextVar("bayeslora_profile", default=None)


@contextlib.contextmanager
def recording(profile: PhaseProfile) -> Iterator[PhaseProfile]:
    """Make ``profile`` the active one inside the block."""
    token = _ACTIVE.set(profile)
    try:
        yield profile
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the block's time to ``name`` on the active profile (a no-op when none is recording)."""
    profile = _ACTIVE.get()
    if profile is None:
        yield
    else:
        with profile.phase(name):
            yield


@contextlib.contextmanager
def filling_cache(cache: str) -> Iterator[list[float | None]]:
    """Charge the block's time to the shared cache ``cache`` (one of :data:`CACHES`), nested fills of other
    caches excluded; yields [seconds charged], set when the block ends ([None] when nothing is recording)."""
    profile = _ACTIVE.get()
    if profile is None:
        yield [None]
    else:
        with profile.filling(cache) as own:
            yield own


def built_on_training(seconds: float) -> None:
    """Record that the active run uses a cached trained adapter whose training took ``seconds``
    (the same whether this run trained it or loaded it)."""
    profile = _ACTIVE.get()
    if profile is not None:
        profile.shared_training_seconds += seconds


@contextlib.contextmanager
def own_seconds() -> Iterator[list[float]]:
    """Wall seconds of the block minus the cache fills inside it; the yielded list holds the value when the
    block ends: ``with own_seconds() as took: ...; took[0]``."""
    profile = _ACTIVE.get()
    before = profile.cache_total() if profile is not None else 0.0
    result = [0.0]
    start = time.perf_counter()
    try:
        yield result
    finally:
        fills = (profile.cache_total() - before) if profile is not None else 0.0
        result[0] = time.perf_counter() - start - fills


_open_windows: list[list[int]] = []
"""The running peak (bytes) of each :func:`peak_memory_window` open around the current code."""


def reset_peak_memory(device: torch.device) -> None:
    """Start a new accelerator peak-memory window (a no-op on CPU, whose peak RSS cannot be reset).
    The peak so far is first handed to every enclosing :func:`peak_memory_window`."""
    if device.type == "cuda":
        current = torch.cuda.max_memory_allocated(device)
        for window in _open_windows:
            window[0] = max(window[0], current)
        torch.cuda.reset_peak_memory_stats(device)


@dataclass
class PeakMemory:
    mb: float = 0.0


@contextlib.contextmanager
def peak_memory_window(device: torch.device) -> Iterator[PeakMemory]:
    """The peak memory over the block, set on the yielded object when the block ends: the maximum of
    ``max_memory_allocated`` over every window that code inside the block resets (the training loop
    and the predictive start their own); the process's peak RSS on CPU."""
    result = PeakMemory()
    reset_peak_memory(device)
    running = [0]
    _open_windows.append(running)
    try:
        yield result
    finally:
        _open_windows.remove(running)
        result.mb = (max(running[0], torch.cuda.max_memory_allocated(device)) / 2**20 if device.type == "cuda"
                     else peak_memory_mb(device))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated since the last reset, or the process's peak resident set
    size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
