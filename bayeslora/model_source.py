"""Where a model's weights come from: the bundled alias, hub aliases, local folders and hub ids.

:func:`check_model_source` refuses, before anything loads, a name that cannot be had (an unknown
alias, a missing or empty folder); :func:`resolve_model_path` turns a name into what transformers
loads (the bundled model's prepared folder, a hub id, or a local folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelSettings
from .errors import ConfigError

HUB_ALIASES = {
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
RANDOM_INIT_ARCHS = ("llama", "qwen2")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_model_source(settings: ModelSettings) -> None:
    """Refuse, before anything loads, a model that cannot be had: ``model.name`` must be the bundled
    alias, a hub alias, an existing local folder with a config and weights, or a hub id (org/name);
    ``random_init`` must name a supported architecture and a tokenizer that passes the same check."""
    from .assets import BUNDLED_MODEL

    if settings.random_init is not None:
        arch = settings.random_init.get("arch", "llama")
        if arch not in RANDOM_INIT_ARCHS:
            raise ConfigError(f"model.random_init.arch must be one of {RANDOM_INIT_ARCHS}, got {arch!r}")
        tokenizer = settings.random_init.get("tokenizer", BUNDLED_MODEL)
        if not isinstance(tokenizer, str):
            raise ConfigError(f"model.random_init.tokenizer must be a model name, got {tokenizer!r}")
        _check_name(tokenizer, "model.random_init.tokenizer", need_weights=False)
        return
    _check_name(settings.name, "model.name", need_weights=True)


def _check_name(name: str, where: str, need_weights: bool) -> None:
    from .assets import BUNDLED_MODEL

    if name == BUNDLED_MODEL or name in HUB_ALIASES:
        return
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(f"{where} {name!r} is a file; give the model's folder (with config.json and weights)")
        if not (local / "config.json").is_file():
            raise ConfigError(f"{where}: the folder {local} has no config.json; it must be a transformers model "
                              f"folder (as written by save_pretrained)")
        if need_weights and not any(p.suffix in WEIGHT_SUFFIXES and p.stat().st_size > 0 for p in local.iterdir()):
            raise ConfigError(f"{where}: the folder {local} holds no weights (*.safetensors or *.bin); copy the "
                              f"model's weight files into it")
        return
    if _looks_like_path(name):
        raise ConfigError(f"{where}: the local model folder {name} does not exist")
    if not HUB_ID.match(name):
        aliases = ", ".join([BUNDLED_MODEL, *HUB_ALIASES])
        raise ConfigError(f"{where} {name!r} is not a known alias ({aliases}), a local folder or a hub id "
                          f"(organisation/name, e.g. Qwen/Qwen2.5-7B)")


def resolve_model_path(name: str) -> str:
    """A bundled alias -> its converted cache dir; a hub alias -> its hub id; otherwise unchanged."""
    from .assets import BUNDLED_MODEL, ensure_model

    if name == BUNDLED_MODEL:
        return str(ensure_model(name))
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
