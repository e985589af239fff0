"""The optional compiled parts of the estimator (``setup.py``): one loader for all of them.

``memfit.allocator._replay`` (the allocator model's replay) and ``memfit.estimator._events`` (the stream's
helpers) are C extensions that ``pip install`` builds where a C compiler is. Each module that has one keeps its
Python version beside it and uses :func:`load`'s answer: the extension, or None where it was not built or
``MEMFIT_PURE_PYTHON=1`` asks for the Python versions only (the tests compare the two)."""

from __future__ import annotations

import importlib
import os


def load(name: str):
    """The compiled module ``name`` (e.g. ``"memfit.allocator._replay"``), or None (not built, or
    ``MEMFIT_PURE_PYTHON`` set)."""
    if os.environ.get("MEMFIT_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
