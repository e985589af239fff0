"""The estimate's largest micro-batch, checked by the trace: the fit answer for training jobs where the estimate's
event stream is coarser than the real step (LoRA with checkpointing above all, validation/trace_verdicts.py).

:func:`verified_max_batch_size` answers the largest micro-batch that both engines run on the card: the estimate's
capped replay (:func:`memfit.estimator.max_batch_size`) and the trace's capped run of the real model code's step
(:func:`memfit.tracer.engine.trace` with ``gpu_memory_bytes``). The trace checks the estimate's answer; where it
runs out of memory there, the same gallop-and-bisect search (:func:`memfit.boundary.largest_passing`) goes down
with the trace as the trial. Where the trace agrees that costs one trace. The trace only vetoes: on the 81 rehearsed
training pairs letting it also raise the answer put two above the real boundary (validation/verify-fit.json, where
the veto put none). Training only: on the rehearsed prefill boundaries the trace's inference verdict is wrong (its
prefill keeps segments the real run frees), so an inference job is refused.
"""

from __future__ import annotations

from typing import Any

from ..errors import JobError

__all__ = ["verified_max_batch_size"]


def verified_max_batch_size(job: Any, gpu_memory_bytes: int, *, limit: int = 1 << 16,
                            spec: Any = None) -> dict[str, Any]:
    """``{"max_batch_size", "estimate_max_batch_size", "trials": [(batch, fits), ...], "first_oom"}``: the largest
    micro-batch both the estimate and the trace run on the card, with the traces it ran (in order) and the refused
    request of the smallest traced batch that failed."""
    from ..boundary import largest_passing
    from ..estimator import max_batch_size
    from .engine import trace

    if job.task != "train":
        raise JobError("--verify checks training jobs only: the trace's verdict for inference is not validated "
                       "(validation/trace_verdicts.py); drop --verify")
    if job.strategy != "single" or job.gpus > 1:
        raise JobError("--verify checks single-GPU jobs: the trace does not run multi-GPU layouts; drop --verify")
    limit = max(1, int(limit))
    est = max_batch_size(job, gpu_memory_bytes, limit=limit, spec=spec)
    ooms: dict[int, Any] = {}

    def runs(b: int) -> bool:
        bd = trace(job.replace(batch_size=b), fallback=False, gpu_memory_bytes=gpu_memory_bytes)
        if not bd.fits:
            ooms[b] = bd.extras.get("first_oom")
        return bool(bd.fits)

    if est == 0:
        return {"max_batch_size": 0, "estimate_max_batch_size": 0, "trials": [], "first_oom": None}
    # both must run: above the estimate's answer the trial fails without a trace
    best, tried = largest_passing(lambda b: b <= est and runs(b), start=est, limit=limit)
    tried = [(b, ok) for b, ok in tried if b <= est]  # the traces run
    failed = sorted(ooms)
    return {"max_batch_size": best, "estimate_max_batch_size": est, "trials": tried,
            "first_oom": ooms[failed[0]] if failed else None}
