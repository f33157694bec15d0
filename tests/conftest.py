"""Shared fixtures: tiny random-init Llama/Qwen2 backbones (fast) on the bundled tokenizer."""

from __future__ import annotations

import pytest
import torch

from bayeslora.backbone import load_backbone
from bayeslora.config import LoraSettings, TrainSettings
from bayeslora.data import EncodedSplit, Example

torch.set_num_threads(2)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def tiny_model_settings(arch: str = "llama", **extra) -> dict:
    return {"name": f"tiny-{arch}", "max_length": 64, "random_init": {"arch": arch, **TINY, **extra}}


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_backbone_any(request):
    return load_backbone(tiny_model_settings(request.param))


@pytest.fixture()
def tiny_backbone():
    return load_backbone(tiny_model_settings("llama"))


def perturb_adapter(backbone, name: str, scale: float = 0.3) -> None:
    """Make B non-zero so the adapter changes the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backbone.lora_parameters(name).values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def toy_examples(n: int, seed: int = 0, k: int = 2) -> list[Example]:
    """A learnable toy task: the label is spelled out in the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    words = ["red", "blue", "green", "gold"]
    for i in range(n):
        y = int(torch.randint(0, k, (1,), generator=g))
        filler = " ".join(words[int(j)] for j in torch.randint(0, 4, (int(torch.randint(1, 6, (1,), generator=g)),),
                                                               generator=g))
        out.append(Example(f"toy-{seed}-{i}", "Task: ", f"{filler} ", f"the answer is {'AB'[y]}. Answer:",
                           tuple(f" {c}" for c in "AB"[:k]), y))
    return out


@pytest.fixture()
def toy_splits(tiny_backbone):
    enc = lambda ex, name: EncodedSplit(ex, tiny_backbone.tokenizer, 64, name)
    return enc(toy_examples(32, 0), "train"), enc(toy_examples(8, 1), "val"), enc(toy_examples(12, 2), "test")


@pytest.fixture()
def fast_adapter_config():
    return {"lora": LoraSettings(r=2, alpha=4, dropout=0.0), "train": TrainSettings(
        epochs=2, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0)}
