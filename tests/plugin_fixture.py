"""A throwaway third-party distribution that registers a method through the entry-point group."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

PLUGIN_SOURCE = '''
import time
from dataclasses import dataclass

import torch

from bayeslora import FitReport, Posterior
from bayeslora.predict import collect_predictive


@dataclass
class Config:
    noise: float = 1.0
    sleep: float = 0.0


class NoisyZeroShot(Posterior):
    """Zero-shot logits plus Gaussian noise per sample: a stand-in third-party posterior."""

    name = "noisy_zero_shot"
    Config = Config
    description = "third-party test plugin"

    def fit(self, backbone, train, val=None):
        self.attach(backbone)
        time.sleep(self.config.sleep)
        return FitReport(fit_seconds=self.config.sleep)

    def predict(self, loader, num_samples):
        bb = self.require_backbone()
        gen = torch.Generator().manual_seed(self.seed)

        def sample(batch):
            z = bb.class_logits(batch)[:, None]
            return z + self.config.noise * torch.randn(z.shape[0], num_samples, z.shape[2], generator=gen)

        return collect_predictive(bb, loader, sample, desc=self.name, progress=False)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass
'''


def install_plugin(root: Path) -> Path:
    """Write package + dist-info metadata (what pip would install) under ``root``; returns root."""
    pkg = root / "toy_bayes_plugin"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    dist = root / "toy_bayes_plugin-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-bayes-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bayeslora.methods]\nnoisy_zero_shot = toy_bayes_plugin:NoisyZeroShot\n")
    return root


def uninstall_plugin(root: Path) -> None:
    sys.modules.pop("toy_bayes_plugin", None)


def install_broken_plugin(root: Path) -> Path:
    """A distribution whose method module fails to import (a missing dependency)."""
    pkg = root / "broken_bayes_plugin"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    dist = root / "broken_bayes_plugin-0.3.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-bayes-plugin\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[bayeslora.methods]\nbroken_method = broken_bayes_plugin:Broken\n")
    return root
