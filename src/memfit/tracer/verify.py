"""The estimate's largest micro-batch, checked by the trace: the fit answer for training jobs where the estimate's
event stream is coarser than the real step (LoRA with checkpointing above all, validation/trace_fit.py).

:func:`verified_max_batch_size` takes :func:`memfit.estimator.max_batch_size`'s answer as the hint of the same
gallop-and-bisect search (:func:`memfit.boundary.largest_passing`) whose trial is the trace's verdict on the card
(:func:`memfit.tracer.engine.trace` with ``gpu_memory_bytes``: every allocation of the real model code's step
through the allocator model capped at the card less the CUDA context). Where the estimate is right that costs two
traces (the answer runs, one more does not). Training only: on the rehearsed prefill boundaries the trace's
inference verdict is wrong (its prefill keeps segments the real run frees), so an inference job is refused.
"""

from __future__ import annotations

from typing import Any

from ..errors import JobError

__all__ = ["verified_max_batch_size"]


def verified_max_batch_size(job: Any, gpu_memory_bytes: int, *, limit: int = 1 << 16,
                            spec: Any = None) -> dict[str, Any]:
    """``{"max_batch_size", "estimate_max_batch_size", "trials": [(batch, fits), ...], "first_oom"}``: the largest
    micro-batch the trace runs on the card, searched from the estimate's answer, with the traces it ran (in order)
    and the refused request of the smallest batch that failed."""
    from ..boundary import largest_passing
    from ..estimator import max_batch_size
    from .engine import trace

    if job.task != "train":
        raise JobError("--verify checks training jobs only: the trace's verdict for inference is not validated "
                       "(validation/trace_fit.py); drop --verify")
    limit = max(1, int(limit))
    est = max_batch_size(job, gpu_memory_bytes, limit=limit, spec=spec)
    ooms: dict[int, Any] = {}

    def runs(b: int) -> bool:
        bd = trace(job.replace(batch_size=b), fallback=False, gpu_memory_bytes=gpu_memory_bytes)
        if not bd.fits:
            ooms[b] = bd.extras.get("first_oom")
        return bool(bd.fits)

    best, tried = largest_passing(runs, start=min(max(est, 1), limit), limit=limit)
    failed = sorted(ooms)
    return {"max_batch_size": best, "estimate_max_batch_size": est, "trials": tried,
            "first_oom": ooms[failed[0]] if failed else None}
