"""A content-addressed store for expensive shared results (trained MAP adapters, features, ...).

An artifact's key is a hash of everything that determines it (model and its weights, adapter and
training settings, the exact tokenised training data, seed, the producing code), so a stale artifact
is never reused: change any of them and the key changes. Each file holds
``{"format", "key", "checksum", "value"}``; it is read with ``weights_only=True`` and used only when
its stored key equals the key asked for and its value matches the checksum. A damaged or foreign
entry is logged with its path, removed and recomputed. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from . import distributed
from .config import to_plain
from .files import DamagedFileError, atomic_torch_save, normalised, remove_orphans, safe_torch_load, value_digest

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "bayeslora-artifact/1"


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-able structure (dataclasses allowed)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def checked_record(path: Path, key: Any) -> Any:
    """The ``value`` of an artifact file written by :meth:`ArtifactStore.save` for ``key``; raises
    DamagedFileError naming the file when it does not load, is not an artifact, holds another key or
    fails its checksum."""
    record = safe_torch_load(path)
    if not isinstance(record, dict) or record.get("format") != ARTIFACT_FORMAT or "value" not in record:
        raise DamagedFileError(f"{path} is not a bayeslora artifact (format {ARTIFACT_FORMAT})")
    if normalised(record.get("key")) != normalised(to_plain(key)):
        raise DamagedFileError(f"{path} holds the artifact of another key (a copied or renamed file)")
    if record.get("checksum") != value_digest(record["value"]):
        raise DamagedFileError(f"{path} fails its checksum (its contents were changed after writing)")
    return record["value"]


class ArtifactStore:
    """Artifacts under ``root/<kind>/<hash>.pt``; ``hits``/``misses`` count lookups, ``discarded`` the
    damaged entries removed. With ``refresh`` on, lookups miss and saves overwrite (a forced rerun)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.discarded: list[Path] = []
        self.refresh = False

    def path(self, kind: str, key: Any) -> Path:
        return self.root / kind / f"{content_hash(key)}.pt"

    def remove_orphans(self) -> None:
        """Delete temporary files that killed writers left in every kind's folder."""
        if self.root.is_dir():
            for folder in self.root.iterdir():
                remove_orphans(folder)

    def get(self, kind: str, key: Any) -> Any | None:
        """The stored value for ``key``, or None (absent, refreshed, or damaged: then removed)."""
        path = self.path(kind, key)
        if self.refresh or not path.exists():
            self.misses += 1
            return None
        try:
            value = checked_record(path, key)
        except DamagedFileError as exc:
            log.warning("discarding cache entry: %s; it will be recomputed", exc)
            self.discarded.append(path)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def save(self, kind: str, key: Any, value: Any) -> Path:
        """Write the artifact (only the main process writes when several run data parallel)."""
        path = self.path(kind, key)
        if distributed.is_main_process():
            record = {"format": ARTIFACT_FORMAT, "key": to_plain(key), "checksum": value_digest(value),
                      "value": value}
            atomic_torch_save(record, path)
        return path
