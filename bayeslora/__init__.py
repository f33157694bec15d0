"""bayeslora: Bayesian LoRA posteriors behind one interface.

    posterior = bayeslora.get_method("map")(config, seed=0)
    posterior.fit(backbone, train, val)
    predictive = posterior.predict(loader, num_samples=10)   # logits (N, S, K)
"""

from .errors import BayesLoraError, ConfigError, DataError, TrainingError, UnknownMethodError
from .posterior import FitReport, Posterior, ResourceNeeds
from .predictive import Cost, Predictive
from .registry import ENTRY_POINT_GROUP, available_methods, get_method, register

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP", "BayesLoraError", "ConfigError", "Cost", "DataError", "FitReport", "Posterior",
    "Predictive", "ResourceNeeds", "TrainingError", "UnknownMethodError", "available_methods", "get_method",
    "register",
]
