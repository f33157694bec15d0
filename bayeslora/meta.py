"""A causal LM built from its config alone on PyTorch's meta device: shapes without weights.

Parameter counts and memory plans for a 7B model are computed without downloading or allocating a
single weight: ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` creates every
module with storage-less tensors. The configs of the headline models ship with the package
(``bayeslora/model_configs/``), so this works offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backbone import Backbone, random_init_config
from .config import ModelSettings
from .errors import ConfigError
from .model_source import HUB_ALIASES, resolve_model_path

PACKAGED_CONFIGS = Path(__file__).with_name("model_configs")


def packaged_config(model: str) -> Path | None:
    """The shipped config.json of ``model`` (an alias or hub id such as Qwen/Qwen2.5-7B), if any."""
    hub_id = HUB_ALIASES.get(model.lower(), model)
    path = PACKAGED_CONFIGS / f"{hub_id.rsplit('/', 1)[-1].lower()}.json"
    return path if path.exists() else None


def meta_backbone(model: str | ModelSettings) -> Backbone:
    """A :class:`Backbone` (no tokenizer) whose modules live on the meta device.

    ``model``: a shipped config (``Qwen/Qwen2.5-7B``, ``qwen2.5-7b``), a folder with a ``config.json``,
    a bundled alias, a hub id (needs the hub), or model settings (their ``random_init`` spec, if any)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = model if isinstance(model, ModelSettings) else ModelSettings(name=model)
    name = settings.name
    shipped = packaged_config(name)
    try:
        if settings.random_init is not None:
            config = random_init_config(settings.random_init)
        elif shipped is not None:
            config = AutoConfig.for_model(**json.loads(shipped.read_text()))
        else:
            config = AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no model config for {name!r}: give a shipped model ({_shipped_names()}), a folder "
                          f"with config.json, or a reachable hub id ({exc})") from exc
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return Backbone(lm, tokenizer=None, settings=settings)


def _shipped_names() -> str:
    return ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.json")))
