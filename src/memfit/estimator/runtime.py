"""What the CUDA runtime and PyTorch's caching allocator add on top of the allocated bytes."""

from __future__ import annotations

from ..job import Job

#: Memory the CUDA context, the loaded kernels (cuBLAS, cuDNN, PyTorch's own) and NCCL-free runtime
#: take on the device, outside PyTorch's allocator. Calibrated from validation records (device total
#: minus peak reserved); see validation/score.py --calibrate.
CUDA_CONTEXT_BYTES = 530 << 20

#: Fraction of the peak the caching allocator holds beyond it (block rounding to 512 B / 2 MiB,
#: 20 MiB segments for mid-sized blocks, blocks freed but not reusable for a larger request).
RESERVE_FRACTION = 0.04
#: Fixed part of the reserve (small-pool 2 MiB segments and partly used large segments).
RESERVE_FIXED_BYTES = 64 << 20


def allocator_reserve_bytes(peak_allocated: int, job: Job) -> int:
    """Reserved minus allocated at the peak: caching-allocator fragmentation. A linear rule in the
    peak, fitted on validation records (not on any single one)."""
    return int(RESERVE_FRACTION * peak_allocated + RESERVE_FIXED_BYTES)


def cuda_context_bytes() -> int:
    """The CUDA context and loaded kernels, as ``nvidia-smi`` counts them beyond PyTorch's reserve."""
    return CUDA_CONTEXT_BYTES
