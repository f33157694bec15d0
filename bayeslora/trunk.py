"""Trunk cache: the frozen layers below the lowest adapted layer, computed once per example.

When every adapter sits in layers >= L, the hidden states entering layer L depend only on the
frozen embeddings and layers 0..L-1, so h_L(x) = f_{L-1} o ... o f_0(embed(x)) is computed once per
prompt and reused by every epoch, method and posterior sample; only layers L..n-1 (and the final
norm at the last position) run each time. Entries are keyed by the prompt's token ids, and the cache
as a whole by a fingerprint of the trunk's weights, so a changed template, tokenizer or model can
never read a stale entry.

Supported decoders: Llama and Qwen2 in transformers (embed_tokens -> layers -> norm, rotary position
embeddings, causal masks from ``transformers.masking_utils``). Other architectures run the full
forward (see :func:`supports_trunk_cache`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import DamagedFileError, atomic_torch_save, safe_torch_load, value_digest
from .profiling import filling_cache

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
DEFAULT_MAX_BYTES = 8 * 2**30


def supports_trunk_cache(lm: nn.Module) -> bool:
    return getattr(lm.config, "model_type", None) in SUPPORTED_MODEL_TYPES


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..n-1 over the real tokens of each left-padded row (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LayerStack:
    """Runs any slice [start, stop) of a Llama/Qwen2 decoder's layers, as the decoder's own forward does."""

    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.config = decoder.config
        n = int(self.config.num_hidden_layers)
        self.layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * n)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            start: int, stop: int) -> torch.Tensor:
        """Hidden states leaving layer ``stop - 1`` given those entering layer ``start`` (B, T, H)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        mask_kwargs = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                       "past_key_values": None, "position_ids": position_ids}
        types = set(self.layer_types[start:stop])
        masks = {"full_attention": create_causal_mask(**mask_kwargs)} if "full_attention" in types else {}
        if "sliding_attention" in types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        position_embeddings = self.decoder.rotary_emb(hidden, position_ids)
        for i in range(start, stop):
            hidden = self.decoder.layers[i](hidden, attention_mask=masks[self.layer_types[i]],
                                            position_embeddings=position_embeddings, position_ids=position_ids,
                                            past_key_values=None, use_cache=False)
        return hidden

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.norm(hidden)


def update_weight_digest(h: Any, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feed name, shape, dtype and a strided sample (~4k values) of every tensor into hash ``h``."""
    with torch.no_grad():
        for name, p in named_tensors:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].double().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.numpy().tobytes())


def trunk_fingerprint(decoder: nn.Module, layer: int, model_id: str, source: Any = None) -> str:
    """Hash of what the trunk's output depends on: architecture, dtype, L, the weights of embed_tokens
    and layers 0..L-1 (a strided sample of every tensor, ~4k values each), the weight files' identity
    (``source``, see :func:`bayeslora.identity.model_identity`) and this module's code."""
    from .identity import source_digest

    h = hashlib.blake2b(digest_size=12)
    h.update(f"{model_id}|{decoder.config.model_type}|L={layer}|{source!r}|{source_digest(__name__)}".encode())
    modules = [("embed_tokens", decoder.embed_tokens)] + [(f"layers.{i}", decoder.layers[i]) for i in range(layer)]
    update_weight_digest(h, ((f"{prefix}.{name}", p) for prefix, module in modules
                             for name, p in module.named_parameters() if "lora_" not in name))
    return h.hexdigest()


class TrunkCache:
    """Hidden states entering layer ``layer``, one (T_i, H) tensor per distinct prompt."""

    def __init__(self, decoder: nn.Module, layer: int, fingerprint: str, max_bytes: int = DEFAULT_MAX_BYTES):
        if not 0 < layer < int(decoder.config.num_hidden_layers):
            raise ValueError(f"trunk layer must be in 1..{decoder.config.num_hidden_layers - 1}, got {layer}")
        self.stack = LayerStack(decoder)
        self.layer = layer
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self.entries: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.computed = 0  # prompts run through the trunk (cache misses)
        self.hits = 0
        self.dirty = False
        self._full_warned = False

    @staticmethod
    def key(tokens: torch.Tensor) -> str:
        return hashlib.blake2b(tokens.cpu().numpy().tobytes(), digest_size=16).hexdigest()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states entering layer L for a (left-)padded batch; pads hold zeros."""
        real = attention_mask.bool()
        keys = [self.key(input_ids[i][real[i]]) for i in range(input_ids.shape[0])]
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            with filling_cache("trunk"):
                fresh = self._compute(input_ids[missing], attention_mask[missing], position_ids[missing],
                                      {row: keys[row] for row in missing})
        first = fresh[missing[0]] if missing else self.entries[keys[0]]
        out = torch.zeros(*input_ids.shape, first.shape[-1], dtype=first.dtype, device=input_ids.device)
        for i, k in enumerate(keys):
            out[i, real[i]] = (fresh[i] if i in fresh else self.entries[k]).to(out.device)
        return out

    def _compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 keys: dict[int, str]) -> dict[int, torch.Tensor]:
        """Run the trunk on the missing rows; ``keys`` maps each row of the full batch to its entry key."""
        # normal (not inference-mode) tensors, so cached states can later feed a training step
        with torch.inference_mode(False), torch.no_grad():
            hidden = self.stack.run(self.stack.embed(input_ids.clone()), attention_mask.clone(),
                                    position_ids.clone(), 0, self.layer)
        self.computed += len(keys)
        real = attention_mask.bool()
        fresh = {}
        for j, (row, key) in enumerate(keys.items()):
            fresh[row] = hidden[j][real[j]].detach()
            self._store(key, fresh[row])
        return fresh

    def _store(self, key: str, state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if self.bytes + size > self.max_bytes:
            if not self._full_warned:
                log.warning("trunk cache full (%.1f GiB); further prompts run the trunk each time",
                            self.bytes / 2**30)
                self._full_warned = True
            return
        self.entries[key] = state.cpu().clone()
        self.bytes += size
        self.dirty = True

    def stats(self) -> dict[str, Any]:
        return {"trunk_layer": self.layer, "trunk_entries": len(self.entries), "trunk_mb": self.bytes / 2**20,
                "trunk_computed": self.computed, "trunk_hits": self.hits}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write all entries (atomically, with a checksum) if any were added since the last save/load."""
        if not self.dirty:
            return
        atomic_torch_save({"fingerprint": self.fingerprint, "layer": self.layer, "checksum": value_digest(self.entries),
                           "entries": self.entries}, Path(path))
        self.dirty = False

    def load(self, path: str | Path) -> bool:
        """Merge entries saved by :meth:`save`; a file from another model or layer is ignored, and a damaged
        one (does not load, fails its checksum) is logged with its path and removed: its entries are
        recomputed as needed."""
        path = Path(path)
        if not path.exists():
            return False
        try:
            saved = safe_torch_load(path)
            if not isinstance(saved, dict) or not isinstance(saved.get("entries"), dict):
                raise DamagedFileError(f"{path} is not a trunk cache file")
            if saved.get("fingerprint") != self.fingerprint or saved.get("layer") != self.layer:
                log.info("ignoring trunk cache %s: it belongs to another model or layer", path.name)
                return False
            if saved.get("checksum") != value_digest(saved["entries"]):
                raise DamagedFileError(f"{path} fails its checksum (its contents were changed after writing)")
        except DamagedFileError as exc:
            log.warning("discarding trunk cache: %s; its states will be recomputed", exc)
            path.unlink(missing_ok=True)
            return False
        for k, v in saved["entries"].items():
            if k not in self.entries:
                self.entries[k] = v
                self.bytes += v.numel() * v.element_size()
        return True
