"""Rehearse a card on a bigger GPU: the allocator setting, this process's CUDA context, and the cap.

A card of ``gpu_memory_bytes`` (what its driver reports as total) gives PyTorch's allocator that much less
the CUDA context. :func:`rehearse_card` measures the context of *this* process on *this* GPU (after CUDA is
initialised and a cuBLAS handle exists) and limits the allocator with
``torch.cuda.set_per_process_memory_fraction((card - context) / total)``; the arithmetic is in
:mod:`memfit.measurer.fit`. The cap is per process, so several rehearsals can share one GPU.

The context is read from NVML's per-process used memory (``nvmlDeviceGetComputeRunningProcesses``, the
number ``nvidia-smi`` shows per process) minus ``torch.cuda.memory_reserved()``. Where NVML cannot see this
process (a container's own PID namespace), it is ``MEMFIT_CUDA_CONTEXT_BYTES`` when a lone probe measured
it on the idle GPU (validation/run_boundaries.py does that before it starts runs side by side), else
``mem_get_info``'s used memory (device-wide: right only when nothing else runs on the GPU). With lazy
module loading (CUDA's default) the context grows a little as new kernels load; the record keeps NVML's
per-process figure at the end too, so that growth can be seen.

``expandable_segments`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) must be chosen before the
allocator is first used: :func:`apply_allocator_setting` sets it when CUDA is not initialised yet and raises
a one-line error when it is, with another setting.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import MemfitError
from .fit import allocator_limit_bytes, cap_fraction

__all__ = ["apply_allocator_setting", "allocator_conf_for", "measure_context", "rehearse_card", "release_card"]

_ENV = "PYTORCH_CUDA_ALLOC_CONF"
#: A context size (bytes) measured by a lone probe process (``python -m memfit.measurer.worker
#: --probe-context``) on the idle GPU; used where NVML cannot see this process, because the device-wide
#: used memory includes the other rehearsals that share the GPU.
CONTEXT_ENV = "MEMFIT_CUDA_CONTEXT_BYTES"


def allocator_conf_for(expandable_segments: bool, current: str | None = None) -> str:
    """``PYTORCH_CUDA_ALLOC_CONF`` for the job: ``current`` with its ``expandable_segments`` option replaced."""
    opts = [o.strip() for o in (current or "").split(",") if o.strip()
            and not o.strip().lower().startswith("expandable_segments")]
    opts.append(f"expandable_segments:{'True' if expandable_segments else 'False'}")
    return ",".join(opts)


def _expandable_in(conf: str | None) -> bool:
    for opt in (conf or "").split(","):
        key, _, value = opt.strip().partition(":")
        if key.strip().lower() == "expandable_segments":
            return value.strip().lower() == "true"
    return False


def _settings(torch: Any) -> str | None:
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if get is None:
        return None
    try:
        return str(get())
    except Exception:  # noqa: BLE001 - an older torch: fall back to the environment
        return None


def apply_allocator_setting(torch: Any, expandable_segments: bool) -> dict[str, Any]:
    """Make this process's CUDA allocator use ``expandable_segments`` as asked; return what was seen.

    Raises :class:`MemfitError` when CUDA is already initialised with the other setting (the allocator
    cannot switch then)."""
    current = _settings(torch)
    env = os.environ.get(_ENV) or os.environ.get("PYTORCH_ALLOC_CONF")
    has = _expandable_in(current if current is not None else env)
    if has != expandable_segments:
        if torch.cuda.is_initialized():
            raise MemfitError(
                f"this process's CUDA allocator already runs with expandable_segments={has}; measure a job with "
                f"expandable_segments={expandable_segments} in a fresh process (memfit measure, or python -m "
                f"memfit.measurer.worker), or set {_ENV}=expandable_segments:{expandable_segments} before Python starts")
        os.environ[_ENV] = allocator_conf_for(expandable_segments, env)
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is not None:
            setter(f"expandable_segments:{'True' if expandable_segments else 'False'}")
    return {"expandable_segments": expandable_segments, _ENV: os.environ.get(_ENV),
            "allocator_settings": _settings(torch)}


def expandable_seen(torch: Any, device: Any) -> bool | None:
    """Whether the allocator's segments are expandable ones (from ``torch.cuda.memory._snapshot()``), None
    when there is no segment to look at or the snapshot has no such field."""
    try:
        snap = torch.cuda.memory._snapshot(device)
    except Exception:  # noqa: BLE001
        return None
    segs = [s for s in snap.get("segments", []) if "is_expandable" in s]
    if not segs:
        return None
    return any(bool(s["is_expandable"]) for s in segs)


def measure_context(torch: Any, device: Any) -> dict[str, Any]:
    """This process's CUDA context on ``device``: CUDA initialised, a cuBLAS handle made and one small
    matmul run, then device memory used by the process minus what PyTorch's allocator reserved."""
    torch.cuda.init()
    torch.cuda.set_device(device)
    torch.cuda.current_blas_handle()
    a = torch.ones(64, 64, device=device)
    (a @ a).sum().item()
    del a
    torch.cuda.synchronize(device)
    seen = expandable_seen(torch, device)
    reserved = int(torch.cuda.memory_reserved(device))
    from .meters import Nvml

    used = Nvml(device).process_used()
    probed = os.environ.get(CONTEXT_ENV)
    if used is not None:
        context, method = int(used) - reserved, "nvml process used - memory_reserved"
    elif probed:
        context, method = int(probed), f"{CONTEXT_ENV} (probed alone on the idle GPU by the runner)"
    else:
        free, total = torch.cuda.mem_get_info(device)
        context = int(total - free) - reserved
        method = "mem_get_info used - memory_reserved (device-wide: assumes nothing else runs on the GPU)"
    return {"cuda_context_bytes": max(context, 0), "context_method": method,
            "reserved_at_context_bytes": reserved, "expandable_segments_seen": seen}


def rehearse_card(torch: Any, meter: Any, gpu_memory_bytes: int) -> dict[str, Any]:
    """Cap the allocator of ``meter.device`` at the card less this process's context; return the facts
    (card, context, fraction, limit, GPU total) for the record. ``meter`` is a CudaMeter: it then reports
    the device total as context + peak reserved and the capacity as the limit."""
    dev = meter.device
    ctx = measure_context(torch, dev)
    total = int(torch.cuda.get_device_properties(dev).total_memory)
    fraction = cap_fraction(int(gpu_memory_bytes), ctx["cuda_context_bytes"], total)
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    limit = allocator_limit_bytes(fraction, total)
    meter.context_bytes = ctx["cuda_context_bytes"]
    meter.limit_bytes = limit
    return {"gpu_memory_bytes": int(gpu_memory_bytes), **ctx, "memory_fraction": fraction,
            "allocator_limit_bytes": limit, "gpu_total_memory_bytes": total}


def release_card(torch: Any, meter: Any) -> None:
    """Lift the cap again (the fraction is per process: a later measurement in it starts uncapped)."""
    torch.cuda.set_per_process_memory_fraction(1.0, meter.device)
    meter.context_bytes = meter.limit_bytes = None
