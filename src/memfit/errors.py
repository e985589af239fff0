"""The exceptions memfit raises.

Every error a user can cause derives from :class:`MemfitError`; its message is one line that says
what was wrong and how to fix it. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations

__all__ = ["MemfitError", "JobError", "ModelNotFoundError", "ConfigError", "MissingDependencyError", "brief"]


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


def brief(value: object, limit: int = 60) -> str:
    """A short ``repr`` of a user's value for an error message, safe for any input: integers too long for
    ``repr`` (Python refuses more than 4300 digits), containers nested too deep, objects whose ``repr``
    fails. Long reprs are cut to ``limit`` characters."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
            return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
        text = repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__} nested or sized beyond display>"
    except Exception:  # noqa: BLE001 - a user's object with a broken __repr__
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(module: str, extra: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed; install it with: pip install 'memfit[{extra}]'"
        ) from exc
