"""memfit: how much GPU memory will this LLM job take on each GPU, where does it go, what would make it fit.

Three engines answer with the same :class:`Breakdown`:

- :func:`estimate` - closed-form accounting, pure Python, no torch (microseconds);
- :func:`trace` - the real model code on fake tensors, on the CPU (seconds; needs ``memfit[trace]``);
- :func:`measure` - the real job on the GPU (needs ``memfit[measure]``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ConfigError, JobError, MemfitError, MissingDependencyError, ModelNotFoundError

__all__ = [
    "Breakdown", "Job", "load_job", "ModelSpec", "load_model", "estimate", "max_batch_size", "measure", "trace", "plan",
    "verified_max_batch_size",
    "MemfitError", "JobError", "ConfigError", "ModelNotFoundError", "MissingDependencyError", "__version__",
]


def __getattr__(name: str):  # lazy: importing memfit stays cheap and torch-free (a cold start pays per module)
    if name == "Breakdown":
        from .breakdown import Breakdown

        return Breakdown
    if name in ("Job", "load_job"):
        from . import job as _j

        return getattr(_j, name)
    if name in ("estimate", "max_batch_size"):
        from . import estimator as _e

        return getattr(_e, name)
    if name in ("ModelSpec", "load_model"):
        from . import models as _m

        return getattr(_m, name)
    if name == "plan":
        from .plan import plan

        return plan
    if name == "measure":
        from .measurer import measure

        return measure
    if name == "trace":
        from .tracer import trace

        return trace
    if name == "verified_max_batch_size":  # the estimate's answer checked by the capped trace (training)
        from .tracer.verify import verified_max_batch_size

        return verified_max_batch_size
    raise AttributeError(f"module 'memfit' has no attribute {name!r}")
