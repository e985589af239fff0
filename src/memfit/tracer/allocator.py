"""Moved to :mod:`memfit.allocator` (the one allocator model, shared with the estimator); kept so old imports work."""

from ..allocator import (LARGE_SEGMENT_BYTES, MIN_BLOCK_BYTES, MIN_LARGE_ALLOC_BYTES, ROUND_LARGE_BYTES,
                         SMALL_REQUEST_BYTES, SMALL_SEGMENT_BYTES, AllocatorConfig, AllocatorOutOfMemory, Block,
                         CachingAllocatorModel, round_size, segment_size)

__all__ = ["CachingAllocatorModel", "AllocatorConfig", "AllocatorOutOfMemory", "Block", "round_size",
           "segment_size", "MIN_BLOCK_BYTES", "SMALL_REQUEST_BYTES", "SMALL_SEGMENT_BYTES", "LARGE_SEGMENT_BYTES",
           "MIN_LARGE_ALLOC_BYTES", "ROUND_LARGE_BYTES"]
