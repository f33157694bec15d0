"""A content-addressed store for expensive shared results (trained MAP adapters, features, ...).

An artifact's key is a hash of everything that determines it (model, adapter settings, training
settings, the exact tokenised training data, seed), so a stale artifact is never reused: change
any of them and the key changes. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .config import to_plain


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-able structure (dataclasses allowed)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ArtifactStore:
    """Artifacts under ``root/<kind>/<hash>.pt``; ``hits``/``misses`` count lookups."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key: Any) -> Path:
        return self.root / kind / f"{content_hash(key)}.pt"

    def load(self, kind: str, key: Any) -> Any | None:
        path = self.path(kind, key)
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        return torch.load(path, map_location="cpu", weights_only=False)

    def save(self, kind: str, key: Any, value: Any) -> Path:
        """Write the artifact (only the main process writes when several run data parallel)."""
        path = self.path(kind, key)
        if distributed.is_main_process():
            atomic_torch_save({"key": to_plain(key), "value": value}, path)
        return path

    def get(self, kind: str, key: Any) -> Any | None:
        record = self.load(kind, key)
        return None if record is None else record["value"]
