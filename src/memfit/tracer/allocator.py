"""A model of PyTorch's CUDA caching allocator: what ``memory_allocated`` and ``memory_reserved`` report.

Pure Python, no torch. It follows ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``) with the
default configuration (no ``PYTORCH_CUDA_ALLOC_CONF``: no ``max_split_size``, no power-of-two rounding, no
expandable segments, one stream):

- every request is rounded up to a multiple of 512 bytes (``round_size``; 512 at least);
- requests of at most 1 MiB come from the *small* pool, larger ones from the *large* pool (``get_pool``);
- a request is served by the smallest cached free block of its pool that is large enough, the lowest
  address first among equals (``get_free_block``: ``lower_bound`` on (size, address));
- with no such block, a new segment is ``cudaMalloc``-ed (``get_allocation_size``): 2 MiB for a small
  request, 20 MiB for a large request under 10 MiB, else the request rounded up to 2 MiB;
- the block handed out is split when what remains is worth keeping (``should_split``): at least 512 bytes in
  the small pool, more than 1 MiB in the large pool. An unsplit block is handed out whole, and
  ``memory_allocated`` counts the whole block (``alloc_found_block`` adds ``block->size``);
- a freed block merges with free neighbours of its segment (``free_block`` / ``try_merge_blocks``) and goes
  back to its pool; segments are never returned to the driver (no ``empty_cache``) unless a capacity is set
  and a new segment would not fit, in which case every fully free segment is released first
  (``release_cached_blocks``), as the allocator does before it reports out of memory.
"""

from __future__ import annotations

from bisect import bisect_left, insort

__all__ = ["CachingAllocatorModel", "Block", "round_size", "segment_size",
           "MIN_BLOCK_BYTES", "SMALL_REQUEST_BYTES", "SMALL_SEGMENT_BYTES", "LARGE_SEGMENT_BYTES",
           "MIN_LARGE_ALLOC_BYTES", "ROUND_LARGE_BYTES"]

MIN_BLOCK_BYTES = 512
"""``kMinBlockSize``: every block is a multiple of 512 bytes."""
SMALL_REQUEST_BYTES = 1 << 20
"""``kSmallSize``: the largest request served from the small pool (1 MiB)."""
SMALL_SEGMENT_BYTES = 2 << 20
"""``kSmallBuffer``: small requests are packed into 2 MiB segments."""
LARGE_SEGMENT_BYTES = 20 << 20
"""``kLargeBuffer``: large requests under 10 MiB are packed into 20 MiB segments."""
MIN_LARGE_ALLOC_BYTES = 10 << 20
"""``kMinLargeAlloc``: from 10 MiB on, a request gets a segment of its own size."""
ROUND_LARGE_BYTES = 2 << 20
"""``kRoundLarge``: own-size segments are rounded up to 2 MiB."""


def round_size(nbytes: int) -> int:
    """``round_size``: the block size a request of ``nbytes`` takes (a multiple of 512, at least 512)."""
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return MIN_BLOCK_BYTES * ((nbytes + MIN_BLOCK_BYTES - 1) // MIN_BLOCK_BYTES)


def segment_size(size: int) -> int:
    """``get_allocation_size``: the segment ``cudaMalloc``-ed for a rounded request that no cached block fits."""
    if size <= SMALL_REQUEST_BYTES:
        return SMALL_SEGMENT_BYTES
    if size < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return ROUND_LARGE_BYTES * ((size + ROUND_LARGE_BYTES - 1) // ROUND_LARGE_BYTES)


class Block:
    """A piece of a segment: allocated or cached free."""

    __slots__ = ("size", "addr", "small", "allocated", "prev", "next", "requested")

    def __init__(self, size: int, addr: int, small: bool) -> None:
        self.size = size
        self.addr = addr
        self.small = small
        self.allocated = False
        self.prev: Block | None = None
        self.next: Block | None = None
        self.requested = 0

    def key(self) -> tuple[int, int]:
        return (self.size, self.addr)


class _Pool:
    """Free blocks of one pool, ordered by (size, address) like ``BlockPool::blocks``."""

    __slots__ = ("keys", "by_key")

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.by_key: dict[tuple[int, int], Block] = {}

    def insert(self, b: Block) -> None:
        k = b.key()
        insort(self.keys, k)
        self.by_key[k] = b

    def remove(self, b: Block) -> None:
        k = b.key()
        i = bisect_left(self.keys, k)
        del self.keys[i]
        del self.by_key[k]

    def best_fit(self, size: int) -> Block | None:
        i = bisect_left(self.keys, (size, -1))
        if i == len(self.keys):
            return None
        k = self.keys[i]
        del self.keys[i]
        return self.by_key.pop(k)


class CachingAllocatorModel:
    """``memory_allocated`` / ``memory_reserved`` of a sequence of mallocs and frees, with their peaks.

    ``capacity_bytes``: device memory the reserve may not exceed (None: unlimited). When a new segment would
    not fit, fully free segments are released first; if it still does not fit, ``oom_requests`` counts it
    and the segment is made anyway (so the trace can go on and report how far over it went).
    """

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.allocated = 0
        self.reserved = 0
        self.requested = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_segments = 0
        self.num_releases = 0
        self.oom_requests = 0
        self._next_addr = 0
        self._small = _Pool()
        self._large = _Pool()
        self._segments: set[Block] = set()  # first block of each segment

    # ----------------------------------------------------------------------------------- public
    def malloc(self, nbytes: int) -> Block:
        """Serve a request of ``nbytes``; return the block (pass it to :meth:`free`)."""
        size = round_size(nbytes)
        small = size <= SMALL_REQUEST_BYTES
        pool = self._small if small else self._large
        block = pool.best_fit(size)
        if block is None:
            block = self._new_segment(size, small)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK_BYTES) if small else (remaining > SMALL_REQUEST_BYTES):
            rest = Block(remaining, block.addr + size, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            pool.insert(rest)
        block.allocated = True
        block.requested = nbytes
        self.allocated += block.size
        self.requested += nbytes
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: Block) -> None:
        """Return ``block`` to its pool, merged with free neighbours."""
        if not block.allocated:
            raise ValueError("block freed twice")
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        block.requested = 0
        pool = self._small if block.small else self._large
        prev = block.prev
        if prev is not None and not prev.allocated:
            pool.remove(prev)
            if prev.prev is None:
                self._segments.discard(prev)
                self._segments.add(block)
            block.addr = prev.addr
            block.size += prev.size
            block.prev = prev.prev
            if prev.prev is not None:
                prev.prev.next = block
        nxt = block.next
        if nxt is not None and not nxt.allocated:
            pool.remove(nxt)
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        pool.insert(block)

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats``: the peaks restart from the current values."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def release_cached(self) -> int:
        """``empty_cache``: give every fully free segment back; return the bytes released."""
        released = 0
        for first in list(self._segments):
            if not first.allocated and first.next is None and first.prev is None:
                (self._small if first.small else self._large).remove(first)
                self._segments.discard(first)
                self.reserved -= first.size
                released += first.size
                self.num_releases += 1
        return released

    # ----------------------------------------------------------------------------------- internals
    def _new_segment(self, size: int, small: bool) -> Block:
        seg = segment_size(size)
        if self.capacity_bytes is not None and self.reserved + seg > self.capacity_bytes:
            self.release_cached()
            if self.reserved + seg > self.capacity_bytes:
                self.oom_requests += 1
        block = Block(seg, self._next_addr, small)
        self._next_addr += seg
        self._segments.add(block)
        self.reserved += seg
        self.num_segments += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return block
