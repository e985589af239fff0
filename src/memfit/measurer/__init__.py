"""measure: run the reference job for real and report what PyTorch's allocator saw.

``from memfit.measurer import measure`` imports no torch; torch, transformers and peft load when a
measurement starts (``pip install 'memfit[measure]'``).

- :func:`measure` - one job, one :class:`~memfit.breakdown.Breakdown` (on a CUDA GPU: the allocator's
  peaks per phase over the steady-state steps; on the CPU: exact live tensor bytes).
- :func:`find_max_batch` - the largest micro-batch that really runs on a card rehearsed on this GPU
  (``measure(..., gpu_memory_bytes=N)`` rehearses one run; :mod:`memfit.measurer.fit` has the search).
- :mod:`memfit.measurer.fresh` - that search in a worker process, its boundary then checked by fresh processes
  (what ``memfit measure --find-max-batch`` answers: a trial after an out-of-memory failure in the search's
  process can run where a user's own run fails).
- :func:`measure_sweep` - the same job over several precisions.
- :func:`write_record` / :func:`read_record` - the JSON record of a run (job, breakdown, env).
- ``python -m memfit.measurer.worker JOB RECORD`` - one job in a fresh process (used by
  ``validation/run_records.py``).
"""

from __future__ import annotations

__all__ = ["measure", "find_max_batch", "measure_sweep", "write_record", "read_record", "SWEEP_PRECISIONS"]


def __getattr__(name: str):
    if name in ("measure", "find_max_batch", "measure_sweep", "SWEEP_PRECISIONS"):
        from . import engine

        return getattr(engine, name)
    if name in ("write_record", "read_record"):
        from . import record

        return getattr(record, name)
    raise AttributeError(f"module 'memfit.measurer' has no attribute {name!r}")
