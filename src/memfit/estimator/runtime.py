"""What the CUDA runtime and PyTorch's caching allocator add on top of the allocated bytes.

The constants are fitted by ``memfit validate --calibrate`` on the measured records that are not held
out (validation/records, H100 80GB HBM3, driver 580.159.04, torch 2.11.0+cu130) and checked on the
held-out ones; they are medians per kind of run, not tuned to any single record.
"""

from __future__ import annotations

from ..job import Job

#: nvidia-smi's total minus PyTorch's reserve: the CUDA context plus the kernels loaded (cuBLAS, cuDNN,
#: PyTorch's own). Training loads the backward and optimizer kernels too. Medians of the records.
CUDA_CONTEXT_TRAIN_BYTES = 767 << 20
CUDA_CONTEXT_INFER_BYTES = 695 << 20

#: Reserved over allocated at the peak (the caching allocator's rounding, 20 MiB segments for mid-size
#: blocks, freed blocks too small for the next request). Checkpointing frees and re-allocates a layer's
#: activations in backward, which fragments the pool more. Medians of the records per kind of run.
RESERVE_RATIO = {"infer": 1.053, "train": 1.070, "train+checkpointing": 1.172}


def reserve_kind(job: Job) -> str:
    if job.task != "train":
        return "infer"
    return "train+checkpointing" if job.gradient_checkpointing else "train"


def allocator_reserve_bytes(peak_allocated: int, job: Job) -> int:
    """Reserved minus allocated at the peak: caching-allocator fragmentation."""
    return int((RESERVE_RATIO[reserve_kind(job)] - 1.0) * peak_allocated)


def cuda_context_bytes(job: Job | None = None) -> int:
    """The CUDA context and loaded kernels, as ``nvidia-smi`` counts them beyond PyTorch's reserve."""
    if job is not None and job.task != "train":
        return CUDA_CONTEXT_INFER_BYTES
    return CUDA_CONTEXT_TRAIN_BYTES
