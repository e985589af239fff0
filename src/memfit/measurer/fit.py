"""Rehearsing a smaller card on a big GPU: the cap arithmetic and the search for the largest batch.

Pure functions, no torch: the measure engine calls them with real trials, the tests with fake ones.

The cap follows PyTorch's ``torch.cuda.set_per_process_memory_fraction(fraction, device)``
(``c10/cuda/CUDACachingAllocator.cpp``, torch 2.x): the caching allocator refuses to hold more than
``fraction * total_memory`` bytes of segments on the device, and before it raises an out-of-memory error it
frees its cached blocks and retries, as it does when ``cudaMalloc`` fails on a full card. The CUDA context
(driver state, module images, cuBLAS handle) lives outside the allocator, so a card of ``card`` bytes
leaves the allocator ``card - context``.
"""

from __future__ import annotations

from typing import Any, Callable

from ..boundary import first_step, largest_passing
from ..errors import JobError

__all__ = ["cap_fraction", "allocator_limit_bytes", "first_step", "search_max_batch"]

GiB = 1 << 30


def cap_fraction(gpu_memory_bytes: int, context_bytes: int, total_memory_bytes: int) -> float:
    """The fraction of this GPU's memory the allocator may use to behave like a card of
    ``gpu_memory_bytes``: ``(card - context) / total``.

    ``context_bytes`` is this process's CUDA context on this GPU (device memory the process uses outside
    PyTorch's allocator), ``total_memory_bytes`` the GPU's total as the driver reports it
    (``torch.cuda.get_device_properties(d).total_memory``).
    """
    for label, v in (("gpu_memory_bytes", gpu_memory_bytes), ("context_bytes", context_bytes),
                     ("total_memory_bytes", total_memory_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise JobError(f"{label} must be a whole number of bytes >= 0; got {v!r}")
    if total_memory_bytes == 0:
        raise JobError("total_memory_bytes must be > 0")
    if gpu_memory_bytes > total_memory_bytes:
        raise JobError(f"cannot rehearse a {gpu_memory_bytes / GiB:.2f} GiB card on this GPU of "
                       f"{total_memory_bytes / GiB:.2f} GiB: the card must not be larger than the GPU")
    if gpu_memory_bytes <= context_bytes:
        raise JobError(f"a {gpu_memory_bytes / GiB:.2f} GiB card leaves nothing after this process's CUDA context "
                       f"of {context_bytes / GiB:.2f} GiB")
    return (gpu_memory_bytes - context_bytes) / total_memory_bytes


def allocator_limit_bytes(fraction: float, total_memory_bytes: int) -> int:
    """The allocator's limit for ``fraction``: ``size_t(fraction * total)``, as ``setMemoryFraction`` stores
    it (``allowed_memory_maximum`` in ``CUDACachingAllocator.cpp``)."""
    return int(fraction * total_memory_bytes)


def search_max_batch(trial: Callable[[int], Any], *, start: int | None = None,
                     limit: int = 1 << 16) -> tuple[int, list[tuple[int, bool]]]:
    """The largest batch ``b`` in ``1..limit`` for which ``trial(b)`` is truthy, proven by ``trial(b + 1)``
    failing (unless ``b == limit``); 0 when ``trial(1)`` fails.

    The search (:func:`memfit.boundary.largest_passing`, shared with the estimator and the planner) gallops
    from ``start`` (default 1): up by strides of d, 2d, 4d, ... while trials pass, or down
    by the same strides while they fail, until it brackets the boundary between a passing and a failing
    batch; then it bisects that bracket. ``d`` is :func:`first_step` of ``start`` (1 below 64). From 1 it
    tries 1, 2, 4, 8, 16, ... (doubling); from a hint ``s < 64`` that is the boundary it needs two trials
    (``s`` passes, ``s + 1`` fails). A hint changes only how many
    trials are run, never the answer, as long as ``trial`` is monotone (a batch that fits implies every
    smaller one fits). Each batch is tried at most once. Returns ``(best, [(batch, passed), ...])`` in the
    order tried.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise JobError(f"limit must be a whole number >= 1; got {limit!r}")
    if start is None:
        start = 1
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise JobError(f"start must be a whole number >= 1 (a batch size to begin the search at); got {start!r}")
    return largest_passing(trial, start=min(start, limit), limit=limit)
