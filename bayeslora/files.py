"""Safe file handling for results folders and caches that other people and machines may have written.

- :func:`safe_torch_load` never unpickles code (``weights_only=True``) and turns every failure (a
  truncated zip, a pickled payload, a missing tensor) into a :class:`DamagedFileError` naming the file.
- :func:`value_digest` hashes nested dicts / lists / tensors / numbers / strings, so a stored record
  can carry a checksum of its own value and be verified after loading.
- Temporary files and folders are named ``.tmp-<host>-<pid>-...`` by their writer
  (:func:`temp_prefix`); :func:`remove_orphans` removes only those whose writer is no longer alive on
  this host, so a process never deletes another's work in progress.
- :func:`file_digest` is the sha256 of a file or a folder's files, memoised on
  (path, size, modification time) in the user cache, so a large local model is read once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import BayesLoraError, first_line

log = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"


class DamagedFileError(BayesLoraError):
    """A file the tool wrote earlier does not load or does not match its checksum or key."""


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temp_prefix(tag: str = "") -> str:
    """``.tmp-[<tag>-]<host>-<pid>-``: who writes the temporary file (see :func:`remove_orphans`)."""
    return f"{TEMP_MARK}{tag + '-' if tag else ''}{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


UNOWNED_TEMP_MAX_AGE_S = 24 * 3600


def temp_owner_dead(entry: Path) -> bool:
    """Whether a ``.tmp-`` entry's writer is known to be gone: written on this host by a pid that is not
    alive. Entries of other hosts (a shared file system) are left alone; entries without a writer in their
    name (an older naming) are removed once a day old."""
    parts = entry.name[len(TEMP_MARK):].split("-")
    host = _host()
    for i in range(len(parts) - 1):
        if parts[i] == host and parts[i + 1].isdigit():
            return not _pid_alive(int(parts[i + 1]))
    named_writer = any(parts[i + 1].isdigit() and not parts[i].isdigit() and len(parts[i]) != 16
                       for i in range(len(parts) - 1))
    if named_writer:
        return False
    try:
        return time.time() - entry.stat().st_mtime > UNOWNED_TEMP_MAX_AGE_S
    except OSError:
        return False


def remove_orphans(folder: Path) -> list[Path]:
    """Remove the ``.tmp-*`` files and folders directly in ``folder`` whose writer died; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.glob(f"{TEMP_MARK}*"):
        if temp_owner_dead(entry):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d temporary entries left by killed processes in %s", len(removed), folder)
    return removed


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(), suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code. A file that does
    not load (truncated, not a torch file, or holding pickled objects) raises DamagedFileError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load means the file cannot be trusted
        raise DamagedFileError(f"{path} does not load as a bayeslora file ({type(exc).__name__}: "
                               f"{first_line(exc)})") from exc


def value_digest(value: Any) -> str:
    """sha256 over a nested value: dict keys (sorted), lists, tensors (dtype, shape, bytes), scalars."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for k in sorted(value, key=str):
            h.update(f"K{k!s}".encode())
            _feed(h, value[k])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"V{type(value).__name__}:{value!r}".encode())


def normalised(value: Any) -> Any:
    """A plain-data value as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------- content digests
_MEMO_FILE = "file-digests.json"
_memo: dict[str, str] | None = None


def cache_root() -> Path:
    """The user cache of bayeslora: ``$BAYESLORA_CACHE`` or ``~/.cache/bayeslora``."""
    return Path(os.environ.get("BAYESLORA_CACHE", Path.home() / ".cache" / "bayeslora"))


def _memo_path() -> Path:
    return cache_root() / _MEMO_FILE


def _load_memo() -> dict[str, str]:
    global _memo
    if _memo is None:
        try:
            loaded = json.loads(_memo_path().read_text())
            _memo = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            _memo = {}
    return _memo


def _save_memo() -> None:
    try:
        atomic_write_text(_memo_path(), json.dumps(_load_memo()))
    except OSError as exc:  # a read-only cache only costs re-reading next time
        log.debug("could not save file digests: %s", exc)


def sha256_of(path: Path) -> str:
    """sha256 of a file's bytes (read now, not memoised)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _one_file_digest(path: Path, memo: dict[str, str]) -> str:
    st = path.stat()
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    if memo_key not in memo:
        memo[memo_key] = sha256_of(path)
    return memo[memo_key]


def files_under(path: Path) -> Iterator[Path]:
    """The regular files of a folder (sorted, hidden ones and temporaries skipped), or the file itself."""
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
            yield p


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's (relative name, file sha256) pairs; memoised per file version
    (the memo is written once per call, when it learned something)."""
    path = Path(path).expanduser()
    memo = _load_memo()
    known = len(memo)
    if path.is_file():
        digest = _one_file_digest(path, memo)
    else:
        h = hashlib.sha256()
        for p in files_under(path):
            h.update(f"{p.relative_to(path).as_posix()}:{_one_file_digest(p, memo)}\n".encode())
        digest = h.hexdigest()
    if len(memo) > known:
        _save_memo()
    return digest
