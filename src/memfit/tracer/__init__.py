"""The trace engine: the job's real model code on fake tensors, every allocation counted as CUDA would.

``memfit.trace(job, model=None)`` returns the same :class:`~memfit.breakdown.Breakdown` as ``estimate`` and
``measure`` (``engine="trace"``, ``measurement="fake-tensors"``), with the allocation timeline of the
measured step in ``extras["timeline"]``. It needs ``pip install 'memfit[trace]'`` (torch, transformers,
peft) and no GPU. Importing this package imports no torch.

- :mod:`.engine` runs :mod:`memfit.reference` under ``FakeTensorMode`` (step 1 warms up, step 2 is measured);
- :mod:`.cuda_emulation` makes the fake CPU run take CUDA's code paths (autocast lists, the sdpa kernel an
  H100 picks and what it saves, dropout and fp16 softmax kernels, grouped MoE matmuls, foreach optimizers);
- :mod:`.tracker` records every storage's birth and death and what it is, plus cuBLAS workspaces;
- :mod:`memfit.allocator` models the CUDA caching allocator (rounding, pools, segments, splitting);
- :mod:`.plot` draws the timeline (terminal, PNG, SVG).

Against the reference H100 (torch 2.11, 13 jobs: Llama 1B/8B, Qwen2.5, GPT-2, OLMoE; all precisions, eager,
checkpointing, LoRA, prefill and generate) the traced ``peak_allocated_bytes`` is within 0.05% of the
measured one; ``peak_reserved_bytes`` within 4%.
"""

from __future__ import annotations

from typing import Any

__all__ = ["trace", "TraceUnsupportedError", "TraceVersionError", "CUDA_CONTEXT_BYTES", "plot_timeline", "ascii_timeline"]


def __getattr__(name: str) -> Any:
    if name in ("trace", "TraceUnsupportedError", "TraceVersionError", "CUDA_CONTEXT_BYTES", "TESTED_VERSIONS"):
        from . import engine

        return getattr(engine, name)
    if name in ("plot_timeline", "ascii_timeline"):
        from . import plot

        return getattr(plot, name)
    raise AttributeError(f"module 'memfit.tracer' has no attribute {name!r}")


def trace(job: Any, model: Any = None, **kwargs: Any):
    """Trace ``job`` on fake tensors; see :func:`memfit.tracer.engine.trace`."""
    from .engine import trace as _trace

    return _trace(job, model, **kwargs)
