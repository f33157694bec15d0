"""Exceptions raised for bad input. Each message names the offending field and the fix."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), cut to ``limit`` characters,
    for one-line errors that wrap a library's."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


class BayesLoraError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(BayesLoraError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class UnknownMethodError(ConfigError, KeyError):
    """A method name that no registered posterior answers to."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class DataError(BayesLoraError, ValueError):
    """A dataset, label or tokenizer does not fit what a task needs."""


class TrainingError(BayesLoraError, RuntimeError):
    """Training diverged (NaN/inf loss) or cannot proceed."""


class AssetError(BayesLoraError, RuntimeError):
    """The offline assets (bundled model, evaluation sets) are missing or broken."""
