"""The one model of PyTorch's CUDA caching allocator that the estimator and the tracer replay through.

Torch-free and fast (O(log n) per malloc/free). Public API::

    from memfit.allocator import CachingAllocatorModel, AllocatorConfig, AllocatorOutOfMemory
    sim = CachingAllocatorModel(capacity_bytes=22 * 2**30,
                                config=AllocatorConfig.from_env_string("expandable_segments:True"),
                                on_oom="raise")
    b = sim.malloc(4096); sim.free(b); sim.peak_reserved

See :mod:`memfit.allocator.model` for the rules and the PyTorch source they follow.
"""

from .config import (LARGE_SEGMENT_BYTES, MIN_BLOCK_BYTES, MIN_LARGE_ALLOC_BYTES, ROUND_LARGE_BYTES,
                     SMALL_REQUEST_BYTES, SMALL_SEGMENT_BYTES, AllocatorConfig, AllocatorConfigError, format_size,
                     round_size, segment_size)
from .model import AllocatorOutOfMemory, Block, CachingAllocatorModel, ReplayStats, replay_both_orders, replay_ops

__all__ = [
    "CachingAllocatorModel", "AllocatorConfig", "replay_ops", "replay_both_orders", "ReplayStats", "AllocatorOutOfMemory", "AllocatorConfigError", "Block",
    "round_size", "segment_size", "format_size", "MIN_BLOCK_BYTES", "SMALL_REQUEST_BYTES", "SMALL_SEGMENT_BYTES",
    "LARGE_SEGMENT_BYTES", "MIN_LARGE_ALLOC_BYTES", "ROUND_LARGE_BYTES",
]
