"""A causal LM built from its config alone on PyTorch's meta device: shapes without weights.

Parameter counts of a method on a 7B model (and anything else that only needs module shapes) are
computed without downloading or allocating a single weight: ``AutoModelForCausalLM.from_config``
under ``torch.device("meta")`` creates every module with storage-less tensors.
"""

from __future__ import annotations

import torch

from .backbone import Backbone, resolve_model_path
from .config import ModelSettings
from .errors import ConfigError


def meta_backbone(model: str) -> Backbone:
    """A :class:`Backbone` (no tokenizer) whose modules live on the meta device.

    ``model``: a folder with a ``config.json`` (e.g. ``configs/models/qwen2.5-7b``), a hub id, or a
    bundled alias."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    except OSError as exc:
        raise ConfigError(f"no model config for {model!r}: give a folder with config.json "
                          f"(e.g. configs/models/qwen2.5-7b) or a reachable hub id ({exc})") from exc
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    return Backbone(lm, tokenizer=None, settings=ModelSettings(name=model))
