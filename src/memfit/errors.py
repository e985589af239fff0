"""The exceptions memfit raises.

Every error a user can cause derives from :class:`MemfitError`; its message is one line that says
what was wrong and how to fix it. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations

__all__ = ["MemfitError", "JobError", "ModelNotFoundError", "ConfigError", "MissingDependencyError"]


class MemfitError(Exception):
    """Base class of every error memfit raises on purpose."""


class JobError(MemfitError, ValueError):
    """A job field has an impossible or unknown value."""


class ConfigError(MemfitError, ValueError):
    """A model's config.json is malformed or describes an architecture memfit cannot count."""


class ModelNotFoundError(MemfitError, LookupError):
    """The model is neither a registry name, a local config, nor a reachable Hub id."""


class MissingDependencyError(MemfitError, ImportError):
    """An optional dependency (torch, transformers, huggingface_hub, ...) is not installed."""


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'memfit[{extra}]'"
        ) from exc
