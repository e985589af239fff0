"""memfit web: a local page and JSON API over the same functions as the CLI (``pip install 'memfit[web]'``).

:func:`create_app` builds the FastAPI application; :mod:`memfit.web.adapter` is the one module that calls
the library, so the views switch to new library functions in one place.
"""

from __future__ import annotations

__all__ = ["create_app"]


def create_app(*args, **kwargs):
    """The FastAPI app (see :func:`memfit.web.app.create_app`)."""
    from .app import create_app as _create

    return _create(*args, **kwargs)
