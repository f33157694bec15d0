"""A causal LM with peft LoRA adapters and an answer head over the K answer-token rows.

The answer head reads only the last prompt position (prompts are left-padded) and only the K
rows of the LM head that belong to the answer tokens: z(x) = W_lm[answer_ids] h_T(x) (+ bias).
Full-vocabulary logits are never materialised. ``lm_head`` in ``lora.target_modules`` adds a LoRA on
the LM head restricted to those K rows (:class:`AnswerHeadLora`):
z(x) = W_lm[answer_ids] h + (alpha/r) B_K A dropout(h), with A (r x H) and B_K (K x r).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraSettings, ModelSettings
from .errors import AssetError, ConfigError, first_line
from .model_source import check_model_source, resolve_model_path
from .predictive import MASKED_LOGIT
from .profiling import phase
from .trunk import TrunkCache, position_ids_from_mask, supports_trunk_cache, trunk_fingerprint

log = logging.getLogger(__name__)

LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's device under data parallelism (cuda:<local rank>), else cuda if available."""
    if name == "auto":
        from . import distributed

        return distributed.device() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype must be auto or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


HEAD_TARGET = "lm_head"
"""The LoRA target name of the answer head (the LM head's K answer rows)."""


def align_answer_columns(values: torch.Tensor, fitted_ids: torch.Tensor, answer_ids: torch.Tensor,
                         fill: torch.Tensor) -> torch.Tensor:
    """Columns for a set's answer tokens from ``values`` (..., K_fit), whose columns belong to the answer tokens
    ``fitted_ids``: column j is ``values[..., k]`` where answer j is fitted token k, else ``fill[..., j]``
    (``fill`` broadcasts to (..., K_set))."""
    position = {int(t): k for k, t in enumerate(fitted_ids.tolist())}
    out = fill.to(values.dtype).expand(*values.shape[:-1], len(answer_ids)).clone()
    for j, token in enumerate(answer_ids.tolist()):
        if int(token) in position:
            out[..., j] = values[..., position[int(token)]]
    return out


class AnswerHeadLora(nn.Module):
    """LoRA on the LM head restricted to the K answer rows, one (A, B_K, dropout) per adapter:
    update(h) = (alpha/r) B_K A dropout(h), (B, K). Row k of B_K belongs to the k-th answer token of the
    training set (``ids``, when known): a set with other answer tokens gets the rows of the tokens they
    share and no update for the others, as a LoRA over the whole LM head would give them (its rows for
    tokens never trained stay at B = 0). Without ``ids`` (an adapter restored from a saved state) the rows
    apply by position and a set with another number of answers is refused.

    Its parameter paths follow peft's (``lora_A.<adapter>.weight``), so the backbone's adapter methods
    (state, requires_grad, ``functional_call`` substitution, MC dropout) treat them as the adapter's own.
    A starts as peft's (Kaiming uniform), B_K at zero."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.ids: dict[str, torch.Tensor] = {}
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str, settings: LoraSettings, hidden: int, num_classes: int, device: torch.device,
            answer_ids: torch.Tensor | None = None) -> None:
        self.lora_A[name] = nn.Linear(hidden, settings.r, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=5**0.5)
        self.lora_B[name] = nn.Linear(settings.r, num_classes, bias=False, device=device)
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.scaling[name] = settings.alpha / settings.r
        if answer_ids is not None:
            self.ids[name] = answer_ids.detach().cpu()

    def remove(self, name: str) -> None:
        for part in (self.lora_A, self.lora_B, self.lora_dropout):
            if name in part:
                del part[name]
        self.scaling.pop(name, None)
        self.ids.pop(name, None)
        if self.active == name:
            self.active = None

    def update(self, features: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, K) update of the active adapter for the set's ``answer_ids``, or None (no head LoRA active, or
        adapters disabled)."""
        name = self.active
        if self.disabled or name is None or name not in self.lora_A:
            return None
        a = self.lora_A[name]
        rows = self.scaling[name] * self.lora_B[name](a(self.lora_dropout[name](features.to(a.weight.dtype))))
        trained = self.ids.get(name)
        if trained is None or torch.equal(trained, answer_ids.cpu()):
            if rows.shape[-1] != len(answer_ids):
                raise ConfigError(f"adapter {name!r} has an lm_head LoRA over {rows.shape[-1]} answer rows; this "
                                  f"set has {len(answer_ids)} answers. Evaluate it on sets with the training "
                                  "set's answers.")
            return rows
        return align_answer_columns(rows, trained, answer_ids, rows.new_zeros(()))


class Backbone:
    """One frozen LM in memory with any number of named LoRA adapters (peft) on it."""

    def __init__(self, model: nn.Module, tokenizer: Any, settings: ModelSettings | None = None):
        self.settings = settings or ModelSettings()
        self.lm = model
        self.tokenizer = tokenizer
        self.peft_model: Any = None
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lm.eval()
        self.num_forward_passes = 0
        self.trunk: TrunkCache | None = None
        self.source_identity: dict[str, Any] | None = None
        """Where the weights came from (:func:`bayeslora.identity.model_identity`); None when built in code."""
        self.answer_lora = AnswerHeadLora()
        self.lm.add_module("answer_head_lora", self.answer_lora)  # its parameters are the LM's: see the class
        self._answer_module = _AnswerLogits(self)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return int(self.lm.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @property
    def model_id(self) -> str:
        return str(getattr(self.lm.config, "_name_or_path", "") or self.settings.name)

    # ------------------------------------------------------------------ forward
    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Last-position hidden state h_T (B, H) after the final norm, in float32.

        With a trunk cache, layers < L come from the cache and only layers L..n-1 run.
        """
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        positions = position_ids_from_mask(mask)
        self.num_forward_passes += input_ids.shape[0]
        if self.trunk is None:
            out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                        use_cache=False)
            return out.last_hidden_state[:, -1].float()
        if "trunk_hidden" in batch:  # states fetched beforehand (see with_trunk_states)
            hidden = batch["trunk_hidden"].to(self.device)
        else:
            hidden = self._trunk_states(input_ids, mask, positions)
        hidden = self.trunk.stack.run(hidden, mask, positions, self.trunk.layer, self.num_layers)
        return self.trunk.stack.final_norm(hidden[:, -1]).float()

    def with_trunk_states(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch plus its cached trunk states under "trunk_hidden" (unchanged without a trunk cache).

        Use it before handing a batch to function transforms (torch.func jacrev/vmap, as laplace-torch's
        Jacobians do), inside which the cache cannot read token ids to look entries up.
        """
        if self.trunk is None:
            return batch
        mask = batch["attention_mask"].to(self.device)
        hidden = self._trunk_states(batch["input_ids"].to(self.device), mask, position_ids_from_mask(mask))
        return {**batch, "trunk_hidden": hidden}

    def _trunk_states(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with phase("trunk"):
            return self.trunk.hidden_states(input_ids, mask, positions)

    # ------------------------------------------------------------------ trunk cache
    def configure_trunk_cache(self, mode: str, lora: LoraSettings | None) -> TrunkCache | None:
        """``mode`` auto: cache layers below the lowest layer ``lora`` adapts (off when that is layer 0,
        or the architecture is not supported); off: always run the full forward.

        The cache object is kept while L and the trunk weights stay the same, so all runs share it.
        """
        if isinstance(mode, bool):  # YAML reads a bare `off` as False
            mode = "auto" if mode else "off"
        if mode not in ("auto", "off"):
            raise ConfigError(f"model.trunk_cache must be auto or off, got {mode!r}")
        layers = self.adapted_layers(lora) if lora is not None else None
        lowest = min(layers) if layers else 0
        if mode == "off" or lowest == 0:
            self.trunk = None
            return None
        if not supports_trunk_cache(self.lm):
            log.info("trunk cache: %s is not a supported architecture (llama, qwen2); running the full forward",
                     self.lm.config.model_type)
            self.trunk = None
            return None
        self._check_adapters_above(lowest)
        fingerprint = trunk_fingerprint(self.lm.get_decoder(), lowest, self.model_id, self.source_identity)
        if self.trunk is None or self.trunk.fingerprint != fingerprint:
            self.trunk = TrunkCache(self.lm.get_decoder(), lowest, fingerprint)
            log.info("trunk cache on: layers 0..%d computed once per prompt", lowest - 1)
        return self.trunk

    def _check_adapters_above(self, layer: int) -> None:
        for name in self.adapter_names():
            cfg_layers = self.peft_model.peft_config[name].layers_to_transform
            low = 0 if cfg_layers is None else min([cfg_layers] if isinstance(cfg_layers, int) else cfg_layers)
            self.check_above_trunk(name, low, layer)

    def check_above_trunk(self, name: str, lowest_layer: int, trunk_layer: int | None = None) -> None:
        """Refuse adapter ``name`` if it changes a layer below the trunk cache's L (``trunk_layer``, or the
        active cache's): the cached states entering L would then be stale."""
        layer = trunk_layer if trunk_layer is not None else (self.trunk.layer if self.trunk is not None else None)
        if layer is not None and lowest_layer < layer:
            raise ConfigError(f"adapter {name!r} adapts layer {lowest_layer}, below the trunk cache's layer {layer}; "
                              f"set model.trunk_cache: off or adapt only layers >= {layer}")

    def head_weight(self, answer_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The K answer rows of the LM head, (K, H), and their bias if the head has one."""
        head = self.lm.get_output_embeddings()
        ids = answer_ids.to(head.weight.device)
        bias = head.bias[ids].float() if getattr(head, "bias", None) is not None else None
        return head.weight[ids].float(), bias

    def head_logits(self, features: torch.Tensor, batch: dict[str, Any], masked: bool = True) -> torch.Tensor:
        """z = W[answer_ids] h + b, with options an example lacks set to MASKED_LOGIT (if ``masked``)."""
        weight, bias = self.head_weight(batch["answer_ids"])
        logits = features @ weight.T
        if bias is not None:
            logits = logits + bias
        update = self.answer_lora.update(features, batch["answer_ids"])
        if update is not None:
            logits = logits + update.float()
        return mask_choices(logits, batch["choice_mask"].to(logits.device)) if masked else logits

    def class_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, K) float32 answer logits of the active adapter(s)."""
        return self.head_logits(self.features(batch), batch)

    def class_logits_with(self, name: str, weights: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        """(B, K) answer logits with adapter ``name`` active and its LoRA weights replaced by ``weights``
        (keys as in :meth:`lora_parameters`), differentiable in ``weights``.

        The substitution is ``torch.func.functional_call``: nothing is copied or written into the
        model, so a weight-space curve phi(t) is evaluated at any t on the one backbone in memory.
        """
        names = self._lora_parameter_names(name)
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ConfigError(f"weights for adapter {name!r} name parameters it does not have: {unknown[:3]}")
        params = {f"lm.{names[k]}": v for k, v in weights.items()}
        with self.using_adapter(name):
            return torch.func.functional_call(self._answer_module, params, (batch,))

    # ------------------------------------------------------------------ adapters
    def add_lora(self, name: str, settings: LoraSettings, seed: int | None = None,
                 num_classes: int | None = None, answer_ids: torch.Tensor | None = None) -> None:
        """Add LoRA adapter ``name`` (A ~ peft default init, B = 0), make it active and trainable. With
        ``lm_head`` among the targets, its answer-head LoRA (:class:`AnswerHeadLora`) has a row per training
        answer token ``answer_ids`` (or ``num_classes`` rows by position)."""
        if answer_ids is not None:
            num_classes = len(answer_ids)
        from peft import LoraConfig, get_peft_model

        if "." in name or not name:
            raise ConfigError(f"adapter name {name!r} must be non-empty and contain no '.' (a module path separator)")
        if name in self.adapter_names():
            raise ConfigError(f"adapter {name!r} already exists on this backbone")
        layer_targets = [m for m in settings.target_modules if m != HEAD_TARGET]
        if not layer_targets:
            raise ConfigError(f"lora.target_modules {settings.target_modules}: lm_head needs at least one layer "
                              "module next to it, e.g. [q_proj, v_proj, lm_head]")
        if HEAD_TARGET in settings.target_modules and num_classes is None:
            raise ConfigError(f"adapter {name!r} targets lm_head: its answer-head LoRA needs the number of answers K "
                              "(add_lora(..., num_classes=K), or the training split's through fit_lora_adapter)")
        if seed is not None:
            torch.manual_seed(seed)
        config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=layer_targets,
            layers_to_transform=self.adapted_layers(settings),
            bias="none",
        )
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.lm, config, adapter_name=name)
            drop_input_require_grads_hook(self.lm)  # peft adds it back on a checkpointed model
        else:
            self.peft_model.add_adapter(name, config)
        if HEAD_TARGET in settings.target_modules:
            self.answer_lora.add(name, settings, self.hidden_size, int(num_classes), self.device, answer_ids)
        if self.trunk is not None:
            try:
                self._check_adapters_above(self.trunk.layer)
            except ConfigError:
                self.delete_adapter(name)
                raise
        self.use_adapter(name)
        self.lm.eval()

    def _checkpointed_layers(self) -> list[nn.Module]:
        """The LM's modules that recompute their forward in backward (transformers' flag)."""
        return [m for m in self.lm.modules() if getattr(m, "gradient_checkpointing", False) is True]

    @property
    def gradient_checkpointing_active(self) -> bool:
        return bool(self._checkpointed_layers())

    @contextlib.contextmanager
    def gradient_checkpointing_paused(self) -> Iterator[None]:
        """Inside the block the checkpointed layers keep their activations (plain backward)."""
        layers = self._checkpointed_layers()
        for m in layers:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in layers:
                m.gradient_checkpointing = True

    @contextlib.contextmanager
    def training_mode(self) -> Iterator[None]:
        """The LM in train mode (LoRA dropout on) inside the block, back in eval mode after it."""
        self.lm.train()
        try:
            yield
        finally:
            self.lm.eval()

    def adapted_layers(self, settings: LoraSettings) -> list[int] | None:
        """Layer indices from ``lora.layers``: None (all), a list, or {"top": N}."""
        layers = settings.layers
        if layers is None:
            return None
        if isinstance(layers, dict):
            if set(layers) != {"top"} or not 1 <= int(layers["top"]) <= self.num_layers:
                raise ConfigError(f"lora.layers must be a list or {{top: N}} with 1 <= N <= {self.num_layers}")
            return list(range(self.num_layers - int(layers["top"]), self.num_layers))
        bad = [i for i in layers if not 0 <= int(i) < self.num_layers]
        if bad:
            raise ConfigError(f"lora.layers {bad} out of range: the model has {self.num_layers} layers")
        return [int(i) for i in layers]

    def adapter_names(self) -> list[str]:
        return list(self.peft_model.peft_config) if self.peft_model is not None else []

    def use_adapter(self, name: str) -> None:
        """Activate adapter ``name``; only its parameters require grad."""
        if name not in self.adapter_names():
            raise ConfigError(f"no adapter named {name!r}; adapters on the backbone: {self.adapter_names()}")
        self.peft_model.set_adapter(name)
        self.answer_lora.active = name
        for pname, p in self.lm.named_parameters():
            p.requires_grad_(f".{name}." in pname and "lora_" in pname)

    @contextlib.contextmanager
    def using_adapter(self, name: str) -> Iterator[None]:
        """Adapter ``name`` active inside the block; the previously active one afterwards."""
        previous = self.peft_model.active_adapter if self.peft_model is not None else None
        self.use_adapter(name)
        try:
            yield
        finally:
            if previous is not None and previous != name and previous in self.adapter_names():
                self.use_adapter(previous)

    def delete_adapter(self, name: str) -> None:
        if name in self.adapter_names():
            others = [n for n in self.adapter_names() if n != name]
            if others and self.peft_model.active_adapter == name:  # activate another first (peft warns otherwise)
                self.use_adapter(others[-1])
            self.peft_model.delete_adapter(name)
            self.answer_lora.remove(name)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base model without any adapter (zero-shot)."""
        if not self.adapter_names():  # never wrapped, or every adapter deleted: the plain base model
            yield
        else:
            self.answer_lora.disabled = True
            try:
                with self.peft_model.disable_adapter():
                    yield
            finally:
                self.answer_lora.disabled = False

    def _lora_parameter_names(self, name: str) -> dict[str, str]:
        """Adapter ``name``'s parameter keys (as in :meth:`lora_parameters`) -> full module paths."""
        return {pname.replace(f".{name}.", "."): pname for pname, _ in self.lm.named_parameters()
                if f".{name}." in pname and "lora_" in pname}

    def lora_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s parameters keyed by their module path (adapter name removed)."""
        return {pname.replace(f".{name}.", "."): p for pname, p in self.lm.named_parameters()
                if f".{name}." in pname and "lora_" in pname}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.lora_parameters(name).items()}

    def ensure_adapter(self, name: str, settings: LoraSettings, seed: int | None = None,
                       num_classes: int | None = None) -> None:
        """Adapter ``name`` on the backbone: added with ``settings`` unless it is there already (reloading a
        posterior's state onto a fresh backbone)."""
        if name not in self.adapter_names():
            self.add_lora(name, settings, seed=seed, num_classes=num_classes)

    def restore_adapter(self, name: str, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
        """:meth:`ensure_adapter`, then its weights from ``state`` (:meth:`adapter_state`'s form; an lm_head
        LoRA's K is read from it)."""
        self.ensure_adapter(name, settings, num_classes=answer_rows(state))
        self.load_adapter_state(name, state)

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        params = self.lora_parameters(name)
        if set(params) != set(state):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ConfigError(f"adapter state does not match adapter {name!r}: missing {missing[:3]}, "
                              f"unexpected {extra[:3]} (was it saved with other lora settings?)")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v.to(params[k].device, params[k].dtype))

    @contextlib.contextmanager
    def lora_dropout_active(self, name: str | None = None, p: float | None = None) -> Iterator[None]:
        """LoRA dropout of adapter ``name`` (all adapters if None) in train mode, at rate ``p`` if given
        (MC dropout); everything else stays in eval mode. Rates and modes are restored on exit."""
        suffix = f"lora_dropout.{name}" if name is not None else "lora_dropout."
        modules = [m for n, m in self.lm.named_modules()
                   if (n.endswith(suffix) if name is not None else suffix in n) and isinstance(m, nn.Dropout)]
        if p is not None and not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), got {p}")
        if (p is None or p > 0) and not modules:
            raise ConfigError(f"adapter {name!r} has no LoRA dropout to activate (trained with lora.dropout: 0); "
                              f"train it with lora.dropout > 0")
        rates = [m.p for m in modules]
        for m in modules:
            m.train()
            if p is not None:
                m.p = p
        try:
            yield
        finally:
            for m, rate in zip(modules, rates, strict=True):
                m.eval()
                m.p = rate


class _AnswerLogits(nn.Module):
    """:meth:`Backbone.class_logits` as a module call over ``lm``, so that torch.func.functional_call
    can substitute the LM's parameters for the duration of one call."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.lm = backbone.lm
        self._class_logits = backbone.class_logits

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._class_logits(batch)


def answer_rows(state: dict[str, torch.Tensor]) -> int | None:
    """K of the lm_head LoRA in an adapter state (its B_K's rows), None if the state has none."""
    for key, value in state.items():
        if key.startswith("answer_head_lora.lora_B"):
            return int(value.shape[0])
    return None


def target_modules(backbone: Backbone, lora: LoraSettings) -> dict[str, nn.Module]:
    """The layer modules ``lora`` names (``target_modules`` in ``lora.layers``), keyed "layers.<i>.<path>";
    ``lm_head`` (the answer-head LoRA, not a layer module) is not among them."""
    layers = backbone.adapted_layers(lora)
    found: dict[str, nn.Module] = {}
    for name, module in backbone.lm.named_modules():
        match = LAYER_INDEX.search(name)
        if match is None or name.rsplit(".", 1)[-1] not in lora.target_modules:
            continue
        if layers is not None and int(match.group(1)) not in layers:
            continue
        found[name[match.start():].lstrip(".")] = module
    if not found:
        raise ConfigError(f"no modules named {lora.target_modules} in layers {layers} of {backbone.model_id}")
    return found


def lora_parameter_count(backbone: Backbone, lora: LoraSettings, num_classes: int = 0) -> int:
    """sum over the target modules of r (d_in + d_out): LoRA's A and B; with lm_head, r (H + K) more."""
    head = lora.r * (backbone.hidden_size + num_classes) if HEAD_TARGET in lora.target_modules else 0
    return head + sum(lora.r * (m.in_features + m.out_features) for m in target_modules(backbone, lora).values())


def mask_choices(logits: torch.Tensor, choice_mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~choice_mask, MASKED_LOGIT)


def random_init_config(spec: dict[str, Any]) -> Any:
    """The transformers config of a ``model.random_init`` spec (arch llama or qwen2 plus config fields)."""
    from transformers import AutoConfig

    spec = {k: v for k, v in spec.items() if k not in ("seed", "tokenizer")}
    arch = spec.pop("arch", "llama")
    defaults = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
                "tie_word_embeddings": True}
    return AutoConfig.for_model(arch, **{**defaults, **spec})


def _random_init_model(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An untrained Llama or Qwen2 built from a config in code (tests and timing), initialised on
    ``device`` in ``dtype`` directly (a 7B one never passes through float32 host memory)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.get("seed", 0))
    with torch.device(device):
        return AutoModelForCausalLM.from_config(random_init_config(spec), dtype=dtype)


def load_backbone(settings: ModelSettings | dict[str, Any] | None = None) -> Backbone:
    """Load a causal LM (bundled alias, hub id or local dir, or ``random_init``) and its tokenizer."""
    from transformers import AutoTokenizer

    from .config import build_dataclass
    from .identity import model_identity

    settings = build_dataclass(ModelSettings, settings, "model") if not isinstance(settings, ModelSettings) \
        else settings
    check_model_source(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.random_init is not None:
        tok_path = resolve_model_path(settings.random_init.get("tokenizer", "smollm2-135m"))
        spec = {k: v for k, v in settings.random_init.items() if k != "tokenizer"}
        model = _random_init_model(spec, device, dtype)
    else:
        tok_path = resolve_model_path(settings.name)
        kwargs: dict[str, Any] = {"dtype": dtype, "revision": settings.revision}
        if settings.load_in_bits is not None:
            kwargs["quantization_config"] = _quantization_config(settings.load_in_bits)
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else None
        model = _load_pretrained(tok_path, kwargs)
    if settings.load_in_bits is None:
        model = model.to(device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        drop_input_require_grads_hook(model)
    if settings.compile:
        compile_decoder_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(tok_path, revision=settings.revision)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.get_output_embeddings() is None or model.get_decoder() is None:
        raise ConfigError(f"model {settings.name!r} has no decoder/LM head; bayeslora needs a causal LM")
    log.info("loaded %s (%s, %s)", settings.name, dtype, device)
    backbone = Backbone(model, tokenizer, settings)
    backbone.source_identity = model_identity(settings)
    return backbone


def _load_pretrained(path: str, kwargs: dict[str, Any]) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained``; a local folder whose files do not load (a truncated or
    damaged weight file) raises AssetError naming the folder instead of a library traceback."""
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and transformers raise many kinds
        raise AssetError(f"the model folder {path} does not load ({type(exc).__name__}: {first_line(exc)}); its weight "
                         f"files may be truncated or damaged: copy them again (for the bundled model, run "
                         f"`bayeslora assets`)") from exc


def drop_input_require_grads_hook(model: nn.Module) -> None:
    """Remove the hook with which transformers and peft make a checkpointed model's embedding outputs
    require grad. Only reentrant checkpointing needs it (bayeslora uses the non-reentrant one), and
    it breaks torch.func transforms such as laplace-torch's GLM Jacobians."""
    model.disable_input_require_grads()


def compile_decoder_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (``nn.Module.compile``), with dynamic shapes since
    batches are padded to their longest prompt. Layers, not the whole model: the embedding lookup,
    the trunk cache and the K-row answer head stay eager, and adapters that peft injects into a layer
    later are traced at its first call."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError("model.compile needs a decoder with a `layers` list (Llama/Qwen2-style); "
                          "set model.compile=false for this model")
    for layer in layers:
        layer.compile(dynamic=True)


def _quantization_config(bits: int) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ConfigError("model.load_in_bits needs bitsandbytes (CUDA): "
                          "pip install 'bayeslora[quantization]'") from exc
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                  bnb_4bit_quant_type="nf4")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"model.load_in_bits must be 4 or 8, got {bits}")
