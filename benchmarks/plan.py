"""``bayeslora plan``: parameter counts, memory and backbone passes of every run of a suite, from configs alone.

Each model is built on the meta device (:func:`bayeslora.meta.meta_backbone`), so nothing is downloaded
or allocated; each method reports its counts through :meth:`Posterior.resource_needs`. Memory is an
estimate, in bytes:

    weights      = P_base x (2 for bf16/fp16, 4 for fp32; bits/8 + 4/64 for 4/8-bit with block scales)
    optimiser    = 16 x trainable            (fp32 value, gradient and two AdamW moments)
    stored       = 4 x stored                (posterior numbers: anchors, SWAG moments, Laplace factors)
    activations  = a B T (8 H + 4 I) per adapted-span layer without gradient checkpointing;
                   a B T H per layer + a B T (8 H + 4 I) for one recomputed layer with it (methods
                   that cannot replay their forward train with it paused: see Posterior)
    train peak   = weights + optimiser + stored + activations, or for a post-hoc curvature fit
                   (Laplace-LoRA) the larger weights + 4 x (trainable + stored + fit_stored)
                   + K x graph(curvature_batch)
    predict peak = weights + 4 x (trainable + stored) + a B_eval T (8 H + 4 I), or with a linearised
                   predictive K x graph(jacobian_batch) in place of the last term

with B the batch size, T ``model.max_length``, H the hidden and I the MLP width, a the activation
bytes (2 under bf16 autocast on GPU, 4 on CPU), and the adapted span the layers from the lowest
adapted one up (the frozen layers below run without keeping activations). 8 H + 4 I counts what one
decoder layer keeps per token for backward (norm outputs, q/k/v/o inputs and outputs, residuals;
gate, up, activation and down inputs); attention runs through SDPA, so no T x T scores are kept.
graph(b) = a b T (8 H + 4 I) per adapted-span layer: a pass in eval mode, where checkpointing does
not apply, whose K outputs are differentiated. Counted K times, it put Laplace-LoRA's planned peaks
on a Qwen2.5-7B-size model (K = 2) 2% under the measured fit and 6% under the measured prediction
(benchmarks/RESULTS.md); larger K was not measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from bayeslora import get_method
from bayeslora.backbone import Backbone, lora_parameter_count, resolve_dtype
from bayeslora.config import LoraSettings, ModelSettings
from bayeslora.data import get_task
from bayeslora.meta import meta_backbone

from .suite import RunSpec, Suite

GB = 1e9
ADAM_BYTES = 16
STORE_BYTES = 4
DEFAULT_GPU_GB = 80.0


@dataclass
class Device:
    """Where runs go: ``gpu`` (``memory_gb`` per device) unless a suite pins ``model.device: cpu``."""

    gpu_memory_gb: float
    cpu_memory_gb: float

    @classmethod
    def detect(cls, gpu_memory_gb: float | None = None) -> Device:
        if gpu_memory_gb is None:
            gpu_memory_gb = (torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available()
                             else DEFAULT_GPU_GB)
        cpu = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
        return cls(gpu_memory_gb, cpu)

    def for_model(self, model: ModelSettings) -> tuple[str, float]:
        if model.device == "cpu":
            return "cpu", self.cpu_memory_gb
        return "gpu", self.gpu_memory_gb


def weight_bytes(n_params: int, model: ModelSettings, on_gpu: bool) -> float:
    """Bytes of the base weights in the dtype the backbone would load them in (or 4/8 bits + block scales)."""
    if model.load_in_bits:
        return n_params * (model.load_in_bits / 8 + 4 / 64)
    return n_params * resolve_dtype(model.dtype, torch.device("cuda" if on_gpu else "cpu")).itemsize


def activation_bytes(backbone: Backbone, lora: LoraSettings | None, model: ModelSettings, batch: int,
                     on_gpu: bool, training: bool, checkpointing: bool = False) -> float:
    """See the module docstring: a B T (8 H + 4 I) per kept layer."""
    config = backbone.lm.config
    per_token_layer = 8 * config.hidden_size + 4 * config.intermediate_size
    a = 2 if on_gpu else 4
    tokens = batch * model.max_length
    if not training:
        return a * tokens * per_token_layer
    layers = backbone.adapted_layers(lora) if lora is not None else None
    span = backbone.num_layers - (min(layers) if layers else 0)
    if checkpointing:
        return a * tokens * (span * config.hidden_size + per_token_layer)
    return a * tokens * span * per_token_layer


def graph_bytes(backbone: Backbone, lora: LoraSettings | None, model: ModelSettings, batch: int,
                on_gpu: bool) -> float:
    """graph(b): what a differentiated eval-mode pass over ``batch`` examples keeps (no checkpointing)."""
    return activation_bytes(backbone, lora, model, batch, on_gpu, training=True, checkpointing=False)


def plan_run(run: RunSpec, backbone: Backbone, device: Device) -> dict[str, Any]:
    """One row: counts, memory (GB), passes per example and whether it fits."""
    cls = get_method(run.method.name)
    num_classes = get_task(run.dataset.name).num_classes
    needs = cls.resource_needs(backbone, run.method_config, num_classes)
    kind, capacity = device.for_model(run.model)
    on_gpu = kind == "gpu"
    base = sum(p.numel() for p in backbone.lm.parameters())
    weights = weight_bytes(base, run.model, on_gpu)
    train_settings = getattr(run.method_config, "train", None)
    lora = getattr(run.method_config, "lora", None) or run.lora
    trains = needs.training_runs > 0 and needs.trainable > 0 and train_settings is not None
    train_peak = 0.0
    if trains:
        train_peak = (weights + ADAM_BYTES * needs.trainable + STORE_BYTES * needs.stored
                      + activation_bytes(backbone, lora, run.model, train_settings.batch_size, on_gpu, True,
                                         run.model.gradient_checkpointing and cls.supports_gradient_checkpointing))
    held = weights + STORE_BYTES * (needs.trainable + needs.stored)
    if needs.curvature_batch:
        train_peak = max(train_peak, held + STORE_BYTES * needs.fit_stored
                         + num_classes * graph_bytes(backbone, lora, run.model, needs.curvature_batch, on_gpu))
    eval_batch = train_settings.eval_batch_size if train_settings is not None else 16
    predict_peak = held + (num_classes * graph_bytes(backbone, lora, run.model, needs.jacobian_batch, on_gpu)
                           if needs.jacobian_batch else
                           activation_bytes(backbone, lora, run.model, eval_batch, on_gpu, False))
    epochs = train_settings.epochs if trains else 0.0
    if trains and train_settings.max_steps:  # a step budget: passes = steps x examples per step / N
        per_step = train_settings.batch_size * train_settings.grad_accum
        epochs = train_settings.max_steps * per_step / run.data.max_train if run.data.max_train else float("nan")
    predict_passes = needs.predict_passes if needs.predict_passes is not None else run.num_samples
    peak = max(train_peak, predict_peak)
    return {
        "model": run.model.name, "method": run.method.label, "dataset": run.dataset.name,
        "targets": ",".join(lora.target_modules) if lora is not None else "",
        "base_params": base, "lora_params": _lora_count(backbone, lora, num_classes), "trainable": needs.trainable,
        "stored": needs.stored, "train_gb": train_peak / GB, "predict_gb": predict_peak / GB,
        "train_passes_per_example": epochs * needs.training_runs, "predict_passes_per_example": predict_passes,
        "n_train": run.data.max_train, "n_test": run.data.max_test, "device": kind, "capacity_gb": capacity,
        "fits": peak <= capacity * GB,
    }


def _lora_count(backbone: Backbone, lora: LoraSettings | None, num_classes: int) -> int:
    return lora_parameter_count(backbone, lora, num_classes) if lora is not None else 0


def plan_suite(suite: Suite, device: Device) -> pd.DataFrame:
    """One row per (model, method, dataset) with ``runs`` = its seeds (the plan does not depend on the seed)."""
    backbones: dict[str, Backbone] = {}
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in suite.runs:
        key = (run.model.name, run.method.label, run.dataset.name)
        if key in rows:
            rows[key]["runs"] += 1
            continue
        if run.model.name not in backbones:
            backbones[run.model.name] = meta_backbone(run.model)
        rows[key] = {**plan_run(run, backbones[run.model.name], device), "runs": 1}
    return pd.DataFrame(list(rows.values()))


def format_plan(table: pd.DataFrame) -> str:
    """The plan as a Markdown table (counts with thousands separators, memory in GB)."""
    from .tables import to_markdown

    shown = pd.DataFrame({
        "model": table["model"], "method": table["method"], "dataset": table["dataset"], "runs": table["runs"],
        "LoRA targets": table["targets"],
        "base params": table["base_params"].map("{:,}".format),
        "LoRA params": table["lora_params"].map("{:,}".format),
        "trainable": table["trainable"].map("{:,}".format), "stored": table["stored"].map("{:,}".format),
        "train GB": table["train_gb"].map("{:.1f}".format), "predict GB": table["predict_gb"].map("{:.1f}".format),
        "train passes/ex": table["train_passes_per_example"].map("{:g}".format),
        "predict passes/ex": table["predict_passes_per_example"],
        "fits": [("yes" if ok else f"NO (> {cap:.0f} GB {dev})")
                 for ok, cap, dev in zip(table["fits"], table["capacity_gb"], table["device"], strict=True)],
    })
    return to_markdown(shown)
