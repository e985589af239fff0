"""A model of PyTorch's CUDA caching allocator: blocks, pools, segments, a card's limit, expandable segments.

Pure Python, no torch. It follows ``DeviceCachingAllocator`` in ``c10/cuda/CUDACachingAllocator.cpp``
(pytorch/pytorch snapshot 001074d2, 2.x main branch; see :mod:`memfit.allocator.config` for the sources and
for why no release tag), for one device and one stream, no CUDA graphs, no cross-stream uses. The order of
``malloc`` and the checks of ``alloc_block`` and ``get_free_block`` were also read in the device-generic
rewrite ``CachingDeviceAllocatorImpl`` (``c10/core/CachingDeviceAllocator.h``, newer main branch): the same.

``malloc`` (the order of ``DeviceCachingAllocator::malloc``)
    1. ``round_size`` the request; ``get_pool``: <= 1 MiB small pool, else large pool;
    2. ``get_free_block``: the smallest cached block of the pool that is large enough, the lowest address
       among equals (``lower_bound`` on (size, address)), with the ``max_split_size`` rules: a request below
       max_split may not take an oversize block; a request at or over it may take one only when it wastes
       less than ``max_non_split_rounding`` (20 MiB by default). Expandable blocks compare by the size they
       could grow to (a free block before unmapped pages is passed over when a tighter one follows);
    3. free-memory callbacks (``trigger_free_memory_callbacks``): none are registered in a plain run
       (PyTorch's only one collects CUDA IPC handles): not modelled;
    4. with a memory fraction and ``garbage_collection_threshold``: ``garbage_collect_cached_blocks``;
    5. ``alloc_block``: fails when ``reserved + get_allocation_size(size) > allowed`` (the fraction's cap,
       ``capacity_bytes`` here); else ``cudaMalloc`` a segment (or map pages of the expandable segment);
    6. if that failed and max_split_size is set: ``release_available_cached_blocks`` (free the smallest
       oversize cached block big enough, or the largest ones until the request is covered) and retry;
    7. if that failed: ``release_cached_blocks`` (cudaFree every cached block that is a whole segment;
       unmap every fully free page of expandable segments) and retry (``num_alloc_retries`` += 1);
    8. if that failed: out of memory (``num_ooms`` += 1): raise :class:`AllocatorOutOfMemory`
       (``on_oom="raise"``) or count it in ``oom_requests`` and make the segment anyway (``on_oom="record"``,
       for the tracer, which goes on to report how far over the card the run went);
    9. ``should_split`` / ``alloc_found_block``: split the block when the rest is worth keeping (>= 512 B in
       the small pool or with expandable segments; > 1 MiB in the large pool, and only for requests below
       max_split). ``memory_allocated`` counts the whole block handed out.

``free`` (``free_block`` / ``try_merge_blocks``): the block merges with free neighbours of its segment (same
mapping state) and goes back to its pool; segments stay reserved until ``release_cached`` (``empty_cache``).

Expandable segments (``ExpandableSegment``, Note [Expandable Segments]): one virtual segment per pool, whose
address space is 1 1/8 of the device's memory, mapped in pages of 2 MiB (small pool, ``kSmallBuffer``) or
20 MiB (large pool, ``large_segment_size``); ``find_expandable_block`` picks the lowest unmapped range (with
the free block just before it) with room, ``map_block`` maps the pages needed and merges them with free
neighbours; ``memory_reserved`` counts mapped pages; ``release_cached_blocks`` unmaps whole free pages
(``unmap_block``) and drops a segment left entirely unmapped. The segment count
(``segment.all.current``) does not change with expandable segments (``alloc_block`` returns before it
counts one), and ``inactive_split`` leaves them out, both as in the source.

Not modelled: several streams and ``record_stream`` events, CUDA graph private pools, ``cudaMallocAsync``,
the driver's own physical limit on a card shared with other processes (``physical_bytes`` is a simple
stand-in), and the driver's address placement. Addresses matter only to break ties between equal-size free
blocks of different segments (``lower_bound`` takes the lowest address); here new large-pool segments take
decreasing addresses and 2 MiB small-pool segments increasing ones, which is what reproduces the H200 record
(validation/records/allocator-cases-h200.json, torch 2.11: with one address direction for both pools, the
large-pool cases drift from the real allocator after a few hundred steps). ``large_addresses="up"`` gives new
large-pool segments increasing addresses instead: the other order a driver may hand out (after segments were
freed, cudaMalloc may place a new one in a range an earlier one left), which the fit verdict of a training
run also replays (:func:`memfit.estimator.fits_on`).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

from ..compiled import load as load_compiled
from ..errors import MemfitError
from .config import (MIN_BLOCK_BYTES, MIN_LARGE_ALLOC_BYTES, ROUND_LARGE_BYTES, SMALL_REQUEST_BYTES,
                     SMALL_SEGMENT_BYTES, AllocatorConfig, format_size, round_size)

__all__ = ["CachingAllocatorModel", "Block", "AllocatorOutOfMemory", "ExpandableSegment", "ReplayStats", "replay_ops"]

_DEFAULT_DEVICE_BYTES = 1 << 40
"""Device memory assumed for an expandable segment's address space (1 1/8 of it) when none is given: only
its size relative to the blocks matters (it is never filled in a run that fits)."""


class AllocatorOutOfMemory(MemfitError, MemoryError):
    """The allocator model ran out of memory under its limit (``torch.OutOfMemoryError`` in a real run).

    Attributes (bytes): ``requested`` (the request), ``alloc_size`` (the segment it needed, what PyTorch's
    message calls "Tried to allocate"), ``allocated``, ``reserved`` and ``limit`` at the failure.
    """

    def __init__(self, requested: int, alloc_size: int, allocated: int, reserved: int, limit: int | None) -> None:
        self.requested = requested
        self.alloc_size = alloc_size
        self.allocated = allocated
        self.reserved = reserved
        self.limit = limit
        allowed = f"{format_size(limit)} allowed; " if limit is not None else ""
        super().__init__(
            f"CUDA out of memory (allocator model). Tried to allocate {format_size(alloc_size)} "
            f"(a request of {requested} bytes). {allowed}{format_size(allocated)} is allocated by PyTorch, and "
            f"{format_size(reserved - allocated)} is reserved by PyTorch but unallocated; lower the batch or "
            "sequence length, or use a larger card")


class ExpandableSegment:
    """``ExpandableSegment``: a virtual address range of ``page_bytes`` pages, mapped page by page."""

    __slots__ = ("base", "page", "size")

    def __init__(self, base: int, page_bytes: int, address_space_bytes: int) -> None:
        self.base = base
        self.page = page_bytes
        self.size = page_bytes * -(-address_space_bytes // page_bytes)  # numSegments(...) * segment_size_


class Block:
    """A piece of a segment: allocated, cached free, or (expandable segments) unmapped address space."""

    __slots__ = ("size", "addr", "small", "allocated", "prev", "next", "requested", "mapped", "seg", "gc_base")

    def __init__(self, size: int, addr: int, small: bool, seg: ExpandableSegment | None = None,
                 mapped: bool = True, prev: Block | None = None, nxt: Block | None = None) -> None:
        self.size = size
        self.addr = addr
        self.small = small
        self.allocated = False
        self.prev = prev
        self.next = nxt
        self.requested = 0
        self.mapped = mapped
        self.seg = seg
        self.gc_base = 0

    def key(self) -> int:
        """The free-pool order ``BlockComparatorSize``: by size, then address (as one int)."""
        return self.size << 64 | self.addr

    @property
    def is_split(self) -> bool:
        """``Block::is_split``: part of a segment with other blocks."""
        return self.prev is not None or self.next is not None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        state = "allocated" if self.allocated else ("free" if self.mapped else "unmapped")
        return f"Block({self.size}, addr={self.addr}, {'small' if self.small else 'large'}, {state})"


class _Pool:
    """``BlockPool``: free blocks ordered by (size, address), and unmapped blocks ordered by address."""

    __slots__ = ("small", "keys", "by_key", "unmapped", "gc_calls")

    def __init__(self, small: bool) -> None:
        self.small = small
        self.keys: list[int] = []  # size << 64 | address: one int compares much faster than a tuple
        self.by_key: dict[int, Block] = {}
        self.unmapped: dict[int, Block] = {}  # addr -> block (few: one per expandable segment, plus holes)
        self.gc_calls = 0  # get_free_blocks_call_count

    def insert(self, b: Block) -> None:
        k = b.size << 64 | b.addr
        insort(self.keys, k)
        self.by_key[k] = b
        b.gc_base = self.gc_calls  # insert_into_blocks

    def remove(self, b: Block) -> None:
        k = b.size << 64 | b.addr
        del self.keys[bisect_left(self.keys, k)]
        del self.by_key[k]


class CachingAllocatorModel:
    """``memory_allocated`` / ``memory_reserved`` of a sequence of mallocs and frees, with their peaks.

    ``capacity_bytes``: the bytes the allocator may reserve, as ``torch.cuda.set_per_process_memory_fraction``
    sets them (``allowed_memory_maximum`` = fraction x device total; pass the card's memory less the CUDA
    context to rehearse a card); None: unlimited. ``config``: the ``PYTORCH_CUDA_ALLOC_CONF`` setting.
    ``on_oom``: ``"raise"`` raises :class:`AllocatorOutOfMemory` when a request cannot be served under the
    limit even after the cache is freed (the model's state is then what PyTorch's is after its OOM: cached
    segments released); ``"record"`` counts it in ``oom_requests`` and makes the segment anyway, over the limit.
    ``physical_bytes``: optionally, what ``cudaMalloc``/``cuMemCreate`` can get at most (the device's free
    memory); unlike the fraction cap it is checked against the pages really mapped.
    ``device_total_bytes``: sets an expandable segment's address space (1 1/8 of it), as the source does.
    """

    def __init__(self, capacity_bytes: int | None = None, *, config: AllocatorConfig | None = None,
                 on_oom: str = "record", physical_bytes: int | None = None,
                 device_total_bytes: int | None = None, large_addresses: str = "down") -> None:
        if on_oom not in ("record", "raise"):
            raise ValueError(f"on_oom must be 'record' or 'raise', got {on_oom!r}")
        if large_addresses not in ("down", "up"):
            raise ValueError(f"large_addresses must be 'down' or 'up', got {large_addresses!r}")
        if capacity_bytes is not None and (isinstance(capacity_bytes, bool) or int(capacity_bytes) < 0):
            raise ValueError(f"capacity_bytes must be a number of bytes >= 0 or None, got {capacity_bytes!r}")
        self.capacity_bytes = None if capacity_bytes is None else int(capacity_bytes)
        self.config = config if config is not None else AllocatorConfig()
        self.on_oom = on_oom
        self.physical_bytes = physical_bytes
        self.device_total_bytes = device_total_bytes or _DEFAULT_DEVICE_BYTES
        cfg = self.config
        self._expandable = cfg.expandable_segments
        self._max_split = cfg.max_split_size
        self._split_limited = cfg.max_split_size_bytes is not None
        self._non_split_rounding = cfg.max_non_split_rounding_bytes
        self._large_segment = cfg.large_segment_bytes
        self._power2 = cfg.rounds_power2
        self._gc = cfg.garbage_collection_threshold  # acts only while a capacity is set (set_fraction)
        # run()'s written-out path: best fit with 512-byte rounding, nothing else
        self._plain = not (self._expandable or self._split_limited or self._gc or self._power2)
        # memory_stats() figures
        self.allocated = 0
        self.reserved = 0
        self.requested = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.peak_requested = 0
        self.num_segments = 0  # segment.all.current
        self.peak_segments = 0
        self.num_allocations = 0  # allocation.all.current
        self.inactive_split = 0
        self.inactive_split_bytes = 0
        self.num_alloc_retries = 0
        self.num_ooms = 0
        self.num_device_alloc = 0  # cudaMalloc calls + page mappings
        self.num_device_free = 0  # cudaFree calls + page unmappings
        self.oom_requests = 0
        self._next_addr = 1 << 20
        self._large_up = large_addresses == "up"
        self._large_addr = (1 << 50) if self._large_up else (1 << 62)  # the next large segment's address (up),
        # or the last one's (down)
        self._small = _Pool(True)
        self._large = _Pool(False)
        self._segments: dict[int, Block] = {}  # non-expandable segments: base address -> first block (snapshots)

    @property
    def num_releases(self) -> int:
        """Segments given back (cudaFree) and page ranges unmapped: ``num_device_free``."""
        return self.num_device_free

    # ------------------------------------------------------------------------------------------- public
    def malloc(self, nbytes: int) -> Block:
        """Serve a request of ``nbytes`` (``DeviceCachingAllocator::malloc``); return the block for :meth:`free`."""
        if self._power2:
            size = round_size(nbytes, self.config)
        elif nbytes < MIN_BLOCK_BYTES:
            size = MIN_BLOCK_BYTES
        else:
            size = (nbytes + 511) & ~511
        small = size <= SMALL_REQUEST_BYTES
        pool = self._small if small else self._large
        if self._plain:
            # get_free_block with no max_split_size, no expandable segments, no GC: plain best fit
            keys = pool.keys
            i = bisect_left(keys, size << 64)
            block = pool.by_key.pop(keys.pop(i)) if i < len(keys) else None
        else:
            block = self._get_free_block(pool, size)
        if block is None:
            if small:
                alloc_size = SMALL_SEGMENT_BYTES
            elif size < MIN_LARGE_ALLOC_BYTES:
                alloc_size = self._large_segment
            else:
                alloc_size = (size + ROUND_LARGE_BYTES - 1) // ROUND_LARGE_BYTES * ROUND_LARGE_BYTES
            if self._gc and self.capacity_bytes is not None:
                self._garbage_collect()
            block = self._alloc_block(pool, size, alloc_size, False)
            if block is None and self._split_limited and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size, False)
            if block is None:
                self.release_cached()
                block = self._alloc_block(pool, size, alloc_size, True)
            if block is None:
                self.num_ooms += 1
                if self.on_oom == "raise":
                    raise AllocatorOutOfMemory(nbytes, alloc_size, self.allocated, self.reserved,
                                               self.capacity_bytes)
                self.oom_requests += 1
                block = self._alloc_block(pool, size, alloc_size, False, force=True)
        return self._alloc_found_block(pool, block, size, nbytes)

    def free(self, block: Block) -> None:
        """Return ``block`` to its pool, merged with free neighbours (``free`` / ``free_block``)."""
        if not block.allocated:
            raise ValueError("block freed twice")
        block.allocated = False
        freed_size = block.size
        self.allocated -= freed_size
        self.requested -= block.requested
        self.num_allocations -= 1
        block.requested = 0
        pool = self._small if block.small else self._large
        keys, by_key = pool.keys, pool.by_key
        merged = 0
        prev = block.prev
        if prev is not None and not prev.allocated and prev.mapped:  # try_merge_blocks(block, prev)
            k = prev.size << 64 | prev.addr
            del keys[bisect_left(keys, k)]
            del by_key[k]
            block.addr = prev.addr
            p = block.prev = prev.prev
            if p is not None:
                p.next = block
            elif prev.seg is None:
                self._segments[prev.addr] = block
            block.size += prev.size
            merged = 1
        nxt = block.next
        if nxt is not None and not nxt.allocated and nxt.mapped:  # try_merge_blocks(block, next)
            k = nxt.size << 64 | nxt.addr
            del keys[bisect_left(keys, k)]
            del by_key[k]
            n = block.next = nxt.next
            if n is not None:
                n.prev = block
            block.size += nxt.size
            merged += 1
        k = block.size << 64 | block.addr
        insort(keys, k)
        by_key[k] = block
        block.gc_base = pool.gc_calls
        if block.seg is None:
            # inactive_split: each merged neighbour was one (its bytes now part of this block); this block is
            # one again if its segment still has other blocks
            if block.prev is not None or block.next is not None:
                self.inactive_split += 1 - merged
                self.inactive_split_bytes += freed_size
            else:
                self.inactive_split -= merged
                self.inactive_split_bytes -= block.size - freed_size

    def run(self, ops, blocks: dict | None = None) -> int:
        """Replay a list of operations in one call: ``(0, handle, nbytes, ...)`` is ``malloc(nbytes)`` (the block
        kept under ``handle`` in ``blocks``), ``(1, handle)`` is ``free`` of that block; other kinds are skipped.
        Stops at the first request that runs out of memory under ``on_oom="raise"`` and returns its index (the
        model's state then is what :meth:`malloc` leaves after raising); -1 when every operation ran.

        The same rules and the same resulting state as calling :meth:`malloc` and :meth:`free` one by one (the
        event stream of :mod:`memfit.estimator.events` is replayed this way): for the default setting the plain
        best-fit path of both is written out here, with the counters held in locals, because a replay of tens
        of thousands of events spends most of its time in call overhead; whatever leaves that path (a new
        segment that would pass the limit, any other setting) goes through :meth:`malloc` itself. One figure is
        not followed event by event: ``inactive_split`` (and its bytes), which no decision reads, is recounted
        from the pools when the loop hands over to :meth:`malloc` and at the end (the same counts)."""
        if blocks is None:
            blocks = {}
        if not self._plain:
            return self._run_generic(ops, blocks)
        skeys, sby = self._small.keys, self._small.by_key
        lkeys, lby = self._large.keys, self._large.by_key
        segments = self._segments
        cap = self.capacity_bytes
        physical = self.physical_bytes
        # the largest reserve a new segment may reach without leaving this loop (the limit's check, and
        # cudaMalloc's against physical_bytes): one comparison per new segment
        limit = min(x for x in (cap, physical, 1 << 126) if x is not None)
        large_segment = self._large_segment
        allocated, reserved, requested = self.allocated, self.reserved, self.requested
        peak_allocated, peak_reserved, peak_requested = self.peak_allocated, self.peak_reserved, self.peak_requested
        num_allocations, num_segments, peak_segments = self.num_allocations, self.num_segments, self.peak_segments
        num_device_alloc = self.num_device_alloc
        next_addr, large_addr = self._next_addr, self._large_addr
        small_gc, large_gc = self._small.gc_calls, self._large.gc_calls
        large_up = self._large_up
        bisect_left_, insort_, Block_ = bisect_left, insort, Block  # locals: the loop's hot names
        min_block, small_request, small_segment = MIN_BLOCK_BYTES, SMALL_REQUEST_BYTES, SMALL_SEGMENT_BYTES

        def sync() -> None:  # locals -> model (before a call into the general path, and at the end)
            self.allocated, self.reserved, self.requested = allocated, reserved, requested
            self.peak_allocated, self.peak_reserved, self.peak_requested = peak_allocated, peak_reserved, peak_requested
            self.num_allocations, self.num_segments, self.peak_segments = num_allocations, num_segments, peak_segments
            self.num_device_alloc = num_device_alloc
            self._next_addr, self._large_addr = next_addr, large_addr
            # inactive_split (the cached blocks of split segments) steers no decision: not counted event by event
            # here, but recounted from the pools
            self._recount_inactive_split()

        for idx, op in enumerate(ops):
            kind = op[0]
            if kind == 0:
                nbytes = op[2]
                size = min_block if nbytes < min_block else (nbytes + 511) & ~511
                small = size <= small_request
                if small:
                    keys, by_key = skeys, sby
                else:
                    keys, by_key = lkeys, lby
                i = bisect_left_(keys, size << 64)
                if i < len(keys):
                    block = by_key.pop(keys.pop(i))
                else:
                    if small:
                        alloc_size = small_segment
                    elif size < MIN_LARGE_ALLOC_BYTES:
                        alloc_size = large_segment
                    else:
                        alloc_size = (size + ROUND_LARGE_BYTES - 1) // ROUND_LARGE_BYTES * ROUND_LARGE_BYTES
                    if reserved + alloc_size > limit:
                        # past the limit: release the cache and retry, or fail, as malloc does
                        sync()
                        try:
                            blocks[op[1]] = self.malloc(nbytes)
                        except AllocatorOutOfMemory:
                            if self.on_oom == "raise":
                                return idx
                            raise
                        allocated, reserved, requested = self.allocated, self.reserved, self.requested
                        peak_allocated, peak_reserved = self.peak_allocated, self.peak_reserved
                        peak_requested = self.peak_requested
                        num_allocations, num_segments = self.num_allocations, self.num_segments
                        peak_segments = self.peak_segments
                        num_device_alloc = self.num_device_alloc
                        next_addr, large_addr = self._next_addr, self._large_addr
                        continue
                    # _alloc_block: a new segment
                    if small:
                        block = Block_(alloc_size, next_addr, True)
                        next_addr += alloc_size
                    elif large_up:
                        block = Block_(alloc_size, large_addr, False)
                        large_addr += alloc_size
                    else:
                        large_addr -= alloc_size
                        block = Block_(alloc_size, large_addr, False)
                    segments[block.addr] = block
                    reserved += alloc_size
                    if reserved > peak_reserved:
                        peak_reserved = reserved
                    num_segments += 1
                    if num_segments > peak_segments:
                        peak_segments = num_segments
                    num_device_alloc += 1
                # _alloc_found_block
                remaining = block.size - size
                if remaining >= min_block if small else remaining > small_request:
                    nxt = block.next
                    rest = Block_(remaining, block.addr + size, small, None, True, block, nxt)
                    if nxt is not None:
                        nxt.prev = rest
                    block.next = rest
                    block.size = size
                    k = remaining << 64 | rest.addr
                    insort_(keys, k)
                    by_key[k] = rest
                    rest.gc_base = small_gc if small else large_gc
                block.allocated = True
                block.requested = nbytes
                allocated += block.size
                requested += nbytes
                num_allocations += 1
                if allocated > peak_allocated:
                    peak_allocated = allocated
                if requested > peak_requested:
                    peak_requested = requested
                blocks[op[1]] = block
            elif kind == 1:
                block = blocks.pop(op[1])
                if not block.allocated:
                    sync()
                    raise ValueError("block freed twice")
                block.allocated = False
                size = block.size
                allocated -= size
                requested -= block.requested
                num_allocations -= 1
                block.requested = 0
                if block.small:
                    keys, by_key, gc = skeys, sby, small_gc
                else:
                    keys, by_key, gc = lkeys, lby, large_gc
                prev = block.prev
                if prev is not None and not prev.allocated:  # try_merge_blocks(block, prev)
                    psize = prev.size
                    addr = prev.addr
                    k = psize << 64 | addr
                    del keys[bisect_left_(keys, k)]
                    del by_key[k]
                    block.addr = addr
                    p = block.prev = prev.prev
                    if p is None:
                        segments[addr] = block
                    else:
                        p.next = block
                    size += psize
                    merged = True
                else:
                    addr = block.addr
                    merged = False
                nxt = block.next
                if nxt is not None and not nxt.allocated:  # try_merge_blocks(block, next)
                    nsize = nxt.size
                    k = nsize << 64 | nxt.addr
                    del keys[bisect_left_(keys, k)]
                    del by_key[k]
                    n = block.next = nxt.next
                    if n is not None:
                        n.prev = block
                    size += nsize
                    merged = True
                if merged:
                    block.size = size
                k = size << 64 | addr
                insort_(keys, k)
                by_key[k] = block
                block.gc_base = gc
        sync()
        return -1

    def _recount_inactive_split(self) -> None:
        """``inactive_split`` / ``inactive_split_bytes`` from the pools: the cached blocks that share their segment
        with other blocks (expandable segments' blocks are left out, as :meth:`free` leaves them out)."""
        n = nbytes = 0
        for pool in (self._small, self._large):
            for b in pool.by_key.values():
                if b.seg is None and (b.prev is not None or b.next is not None):
                    n += 1
                    nbytes += b.size
        self.inactive_split, self.inactive_split_bytes = n, nbytes

    def _run_generic(self, ops, blocks: dict) -> int:
        """:meth:`run` for any setting: one :meth:`malloc` / :meth:`free` call per operation."""
        malloc, free = self.malloc, self.free
        for idx, op in enumerate(ops):
            kind = op[0]
            if kind == 0:
                try:
                    blocks[op[1]] = malloc(op[2])
                except AllocatorOutOfMemory:
                    if self.on_oom == "raise":
                        return idx
                    raise
            elif kind == 1:
                free(blocks.pop(op[1]))
        return -1

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats``: the peaks restart from the current values."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.peak_requested = self.requested
        self.peak_segments = self.num_segments

    def release_cached(self) -> int:
        """``empty_cache`` (``release_cached_blocks``): cudaFree every cached block that is a whole segment,
        unmap every fully free page of the expandable segments; return the bytes given back."""
        before = self.reserved
        for pool in (self._large, self._small):
            to_unmap = []
            for k in list(pool.keys):
                b = pool.by_key[k]
                if b.seg is not None:
                    to_unmap.append(b)
                elif b.prev is None and b.next is None:
                    self._release_block(b, pool)
            for b in to_unmap:
                self._unmap_block(b, pool)
                if b.prev is None and b.next is None and not b.mapped:
                    del pool.unmapped[b.addr]  # release_expandable_segment
        return before - self.reserved

    def memory_stats(self) -> dict[str, int]:
        """The keys of ``torch.cuda.memory_stats()`` this model counts (aggregate pool, ``.all.``)."""
        return {
            "allocated_bytes.all.current": self.allocated, "allocated_bytes.all.peak": self.peak_allocated,
            "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.peak_reserved,
            "requested_bytes.all.current": self.requested, "requested_bytes.all.peak": self.peak_requested,
            "segment.all.current": self.num_segments, "segment.all.peak": self.peak_segments,
            "allocation.all.current": self.num_allocations,
            "inactive_split.all.current": self.inactive_split,
            "inactive_split_bytes.all.current": self.inactive_split_bytes,
            "num_alloc_retries": self.num_alloc_retries, "num_ooms": self.num_ooms,
            "num_device_alloc": self.num_device_alloc, "num_device_free": self.num_device_free,
        }

    def segments(self) -> list[dict]:
        """Like ``torch.cuda.memory_snapshot()``: one entry per segment (per mapped range when expandable),
        with its total size, allocated bytes and (size, allocated) of its blocks, in address order."""
        anchors = list(self._segments.values())
        for pool in (self._small, self._large):
            anchors.extend(pool.by_key.values())
            anchors.extend(pool.unmapped.values())
        firsts: dict[int, Block] = {}
        for b in anchors:
            while b.prev is not None:
                b = b.prev
            firsts[id(b)] = b
        out = []
        for first in firsts.values():
            run: list[Block] = []
            c: Block | None = first
            while True:
                if c is not None and c.mapped:
                    run.append(c)
                elif run:
                    out.append({"address": run[0].addr, "is_large": not run[0].small,
                                "is_expandable": run[0].seg is not None,
                                "total_size": sum(x.size for x in run),
                                "allocated_size": sum(x.size for x in run if x.allocated),
                                "blocks": [(x.size, x.allocated) for x in run]})
                    run = []
                if c is None:
                    break
                c = c.next
        out.sort(key=lambda s: s["address"])
        return out

    # ------------------------------------------------------------------------------------------- internals
    def _get_free_block(self, pool: _Pool, size: int) -> Block | None:
        """``get_free_block``: best fit in the pool, with the expandable and max_split_size rules."""
        if self._gc and self.capacity_bytes is not None:
            pool.gc_calls += 1
        keys = pool.keys
        i = bisect_left(keys, size << 64)
        n = len(keys)
        if i == n:
            return None
        by_key = pool.by_key
        b = by_key[keys[i]]
        if b.seg is not None:
            # compare by the size the block could grow to (itself plus unmapped pages right after it)
            nb = b.next
            grow = b.size + (nb.size if nb is not None and not nb.mapped else 0)
            while b.seg is not None and i + 1 < n:
                c = by_key[keys[i + 1]]
                cn = c.next
                cgrow = c.size + (cn.size if cn is not None and not cn.mapped else 0)
                if cgrow >= grow:
                    break
                i += 1
                b, grow = c, cgrow
        if size < self._max_split:
            if b.size >= self._max_split:
                return None  # an oversize block is not cut up for a smaller request
        elif b.size >= size + self._non_split_rounding:
            return None  # an oversize request may round up into a cached block, but not by too much
        del keys[i]
        del by_key[b.size << 64 | b.addr]
        return b

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, retry: bool, force: bool = False) -> Block | None:
        """``alloc_block``: a new segment of ``alloc_size`` (or mapped pages), unless it would pass the limit."""
        if retry:
            self.num_alloc_retries += 1
        cap = self.capacity_bytes
        if not force and cap is not None and self.reserved + alloc_size > cap:
            return None
        if self._expandable:
            return self._try_allocate_expandable_block(pool, size, force)
        if not force and self.physical_bytes is not None and self.reserved + alloc_size > self.physical_bytes:
            return None  # cudaMalloc fails
        if pool.small:
            block = Block(alloc_size, self._next_addr, True)
            self._next_addr += alloc_size
        elif self._large_up:
            block = Block(alloc_size, self._large_addr, False)
            self._large_addr += alloc_size
        else:
            self._large_addr -= alloc_size
            block = Block(alloc_size, self._large_addr, False)
        self._segments[block.addr] = block
        self.reserved += alloc_size
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        self.num_segments += 1
        if self.num_segments > self.peak_segments:
            self.peak_segments = self.num_segments
        self.num_device_alloc += 1
        return block

    def _alloc_found_block(self, pool: _Pool, block: Block, size: int, nbytes: int) -> Block:
        """``should_split`` + ``alloc_found_block``: split off the rest when worth keeping; count the block."""
        remaining = block.size - size
        if pool.small or self._expandable:
            split = remaining >= MIN_BLOCK_BYTES
        else:
            split = size < self._max_split and remaining > SMALL_REQUEST_BYTES
        was_split = block.prev is not None or block.next is not None
        if split:
            nxt = block.next
            rest = Block(remaining, block.addr + size, block.small, block.seg)
            rest.prev = block
            rest.next = nxt
            if nxt is not None:
                nxt.prev = rest
            block.next = rest
            block.size = size
            k = remaining << 64 | rest.addr  # pool.insert(rest), inlined
            insort(pool.keys, k)
            pool.by_key[k] = rest
            rest.gc_base = pool.gc_calls
            if block.seg is None:
                if was_split:
                    self.inactive_split_bytes -= size
                else:
                    self.inactive_split_bytes += remaining
                    self.inactive_split += 1
        elif was_split and block.seg is None:
            self.inactive_split_bytes -= block.size
            self.inactive_split -= 1
        block.allocated = True
        block.requested = nbytes
        self.allocated += block.size
        self.requested += nbytes
        self.num_allocations += 1
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested
        return block

    def _merge(self, dst: Block, src: Block, pool: _Pool) -> int:
        """``try_merge_blocks`` (caller checked ``src`` is free and mapped like ``dst``): ``dst`` absorbs it."""
        if src.mapped:
            pool.remove(src)
        else:
            del pool.unmapped[src.addr]
        if dst.prev is src:
            dst.addr = src.addr
            p = dst.prev = src.prev
            if p is not None:
                p.next = dst
            elif src.seg is None:
                self._segments[src.addr] = dst  # dst is the segment's first block now
        else:
            dst.next = src.next
            if src.next is not None:
                src.next.prev = dst
        dst.size += src.size
        return src.size

    def _try_merge(self, dst: Block, src: Block | None, pool: _Pool) -> int:
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        return self._merge(dst, src, pool)

    def _release_block(self, b: Block, pool: _Pool) -> None:
        """``release_block``: cudaFree a cached block that is a whole segment."""
        pool.remove(b)
        del self._segments[b.addr]
        self.reserved -= b.size
        self.num_segments -= 1
        self.num_device_free += 1

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """``release_available_cached_blocks`` (only with max_split_size set): cudaFree the smallest oversize
        cached block at least as large as the request, or else the largest oversize ones, from the top down,
        until they cover it. Expandable blocks are passed over (as the newer source does; the older asserted
        there were none); so are split ones, which no oversize block is (``should_split`` never splits them)."""
        keys = pool.keys
        target = max(size, self._max_split)
        i = bisect_left(keys, target << 64)
        if i < len(keys) and pool.by_key[keys[i]].seg is None:
            b = pool.by_key[keys[i]]
            if b.prev is None and b.next is None:
                self._release_block(b, pool)
            return True
        if i == 0:
            return False
        released = 0
        i -= 1
        while released < target:
            b = pool.by_key[keys[i]]
            if b.size < self._max_split:
                break
            if b.seg is None and b.prev is None and b.next is None:
                released += b.size
                self._release_block(b, pool)  # removes keys[i]: keys[i - 1] is next either way
            if i == 0:
                break
            i -= 1
        return released >= target

    def _garbage_collect(self) -> None:
        """``garbage_collect_cached_blocks``: past ``threshold x allowed`` reserved, cudaFree unsplit cached
        large blocks whose age (``get_free_block`` calls since they were cached) is at least the average,
        repeating until the excess is reclaimed or nothing more can go."""
        limit = int(self._gc * self.capacity_bytes)
        if self.reserved <= limit:
            return
        target = self.reserved - limit
        pool = self._large
        calls = pool.gc_calls
        # the average age counts every unsplit cached block; expandable ones are never released here
        candidates = [b for b in pool.by_key.values() if b.prev is None and b.next is None]
        if not candidates:
            return
        total_age = sum(calls - b.gc_base for b in candidates)
        count = len(candidates)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and count > 0:
            threshold = total_age / count
            freed = False
            for k in list(pool.keys):
                b = pool.by_key.get(k)
                if b is None or b.prev is not None or b.next is not None or b.seg is not None:
                    continue
                age = calls - b.gc_base
                if age >= threshold:
                    freed = True
                    reclaimed += b.size
                    total_age -= age
                    count -= 1
                    self._release_block(b, pool)

    # --------------------------------------------------------------------------- expandable segments
    def _try_allocate_expandable_block(self, pool: _Pool, size: int, force: bool) -> Block | None:
        """``try_allocate_expandable_block``: map pages at the lowest address with room for ``size``."""
        c = self._find_expandable_block(pool, size)
        if not c.mapped and not self._map_block(c, min(c.size, size), pool, force):
            return None
        while c.size < size:
            nxt = c.next  # free -> unmapped -> ...: map some of it, it absorbs the free block
            if not self._map_block(nxt, min(size - c.size, nxt.size), pool, force):
                return None
            c = nxt
        pool.remove(c)
        return c

    def _find_expandable_block(self, pool: _Pool, size: int) -> Block:
        """``find_expandable_block``: the lowest unmapped range (with the free block before it) that has
        ``size`` bytes of free or unmapped address space; else a new expandable segment."""
        for addr in sorted(pool.unmapped):
            c = pool.unmapped[addr]
            p = c.prev
            if p is not None and not p.allocated:
                c = p
            room = 0
            b = c
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return c
        page = SMALL_SEGMENT_BYTES if pool.small else self._large_segment
        seg = ExpandableSegment(self._next_addr, page, self.device_total_bytes + self.device_total_bytes // 8)
        self._next_addr += seg.size + page
        c = Block(seg.size, seg.base, pool.small, seg, mapped=False)
        pool.unmapped[c.addr] = c
        return c

    def _map_block(self, b: Block, size: int, pool: _Pool, force: bool) -> bool:
        """``map_block``: map the pages covering the first ``size`` bytes of unmapped ``b``; merge with free
        neighbours; ``memory_reserved`` grows by the pages mapped."""
        seg = b.seg
        page = seg.page
        off = b.addr - seg.base
        begin = off // page
        end = -(-(off + size) // page)
        nbytes = (end - begin) * page
        if nbytes == 0:
            return False
        if not force and self.physical_bytes is not None and self.reserved + nbytes > self.physical_bytes:
            return False  # cuMemCreate fails: the pages created for this call are released again
        del pool.unmapped[b.addr]
        b.mapped = True
        if nbytes < b.size:
            rest = Block(b.size - nbytes, b.addr + nbytes, b.small, seg, mapped=False)
            rest.prev, rest.next = b, b.next
            if b.next is not None:
                b.next.prev = rest
            b.next = rest
            pool.unmapped[rest.addr] = rest
            b.size = nbytes
        p = b.prev
        if p is not None and not p.allocated and p.mapped:
            self._merge(b, p, pool)
        n = b.next
        if n is not None and not n.allocated and n.mapped:
            self._merge(b, n, pool)
        pool.insert(b)
        self.reserved += nbytes
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        self.num_device_alloc += 1
        return True

    def _unmap_block(self, b: Block, pool: _Pool) -> None:
        """``unmap_block``: unmap the whole pages inside free block ``b``; what is left either side stays free."""
        seg = b.seg
        page = seg.page
        off = b.addr - seg.base
        begin = -(-off // page)
        end = (off + b.size) // page
        if begin >= end:
            return
        pool.remove(b)
        start = seg.base + begin * page
        length = (end - begin) * page
        before = start - b.addr
        if before > 0:
            bf = Block(before, b.addr, b.small, seg)
            bf.prev, bf.next = b.prev, b
            if b.prev is not None:
                b.prev.next = bf
            b.prev = bf
            pool.insert(bf)
        after = b.size - before - length
        if after > 0:
            af = Block(after, start + length, b.small, seg)
            af.prev, af.next = b, b.next
            if b.next is not None:
                b.next.prev = af
            b.next = af
            pool.insert(af)
        b.addr = start
        b.size = length
        b.mapped = False
        self._try_merge(b, b.prev, pool)
        self._try_merge(b, b.next, pool)
        pool.unmapped[b.addr] = b
        self.reserved -= length
        self.num_device_free += 1


_STATS = ("allocated", "reserved", "requested", "peak_allocated", "peak_reserved", "peak_requested", "num_segments",
          "peak_segments", "num_allocations", "num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")


@dataclass
class ReplayStats:
    """What :func:`replay_ops` leaves: the index of the request that ran out of memory (-1: every operation
    ran) and the model's ``memory_stats()`` figures after the run, by the :class:`CachingAllocatorModel`
    attribute names; ``compiled``: whether the compiled replay made them."""

    index: int
    allocated: int
    reserved: int
    requested: int
    peak_allocated: int
    peak_reserved: int
    peak_requested: int
    num_segments: int
    peak_segments: int
    num_allocations: int
    num_alloc_retries: int
    num_ooms: int
    num_device_alloc: int
    num_device_free: int
    compiled: bool = False


#: the compiled replay (None: the Python model replays everything); tests set it to compare the two
COMPILED = load_compiled("memfit.allocator._replay")

#: limits at or above this are no limit for the compiled replay (its figures are 64-bit)
_NO_LIMIT = 1 << 62


def replay_ops(ops: list, capacity_bytes: int | None = None, *, config: AllocatorConfig | None = None,
               device_total_bytes: int | None = None, large_addresses: str = "down",
               cancel: bytearray | None = None) -> ReplayStats | None:
    """A fresh :class:`CachingAllocatorModel` (``on_oom="raise"``) after :meth:`~CachingAllocatorModel.run` of
    ``ops``: where the request that ran out of memory is, and the figures.

    For the default setting and for ``expandable_segments`` (without ``max_split_size``, a garbage-collection
    threshold or power-of-two rounding) the compiled replay of ``_replay.c`` does it when it is built: the same
    rules, checked against this model figure for figure by tests/test_allocator_fast.py, some 10-40 times
    faster; otherwise the model itself. ``ops``: a list of operation tuples (:meth:`~CachingAllocatorModel.run`)
    whose malloc handles are ints >= 0, or the estimator's stream (:class:`memfit.estimator.events.Stream`: the
    compiled replay reads the compiled one's operations as it keeps them). ``device_total_bytes``,
    ``large_addresses``: as :class:`CachingAllocatorModel`. ``cancel``: a bytearray another thread may set
    (its first byte) to stop a compiled replay of a stream, which then returns None (the compiled replay of a
    stream runs without the GIL); the Python model does not read it."""
    if large_addresses not in ("down", "up"):
        raise ValueError(f"large_addresses must be 'down' or 'up', got {large_addresses!r}")
    cfg = config if config is not None else AllocatorConfig()
    compiled = not (cfg.max_split_size_bytes is not None or cfg.garbage_collection_threshold or cfg.rounds_power2)
    flat = False
    if not isinstance(ops, list):  # a stream: the compiled one's buffer, else its tuples
        try:
            memoryview(ops).release()
            flat = True
        except TypeError:
            ops = getattr(ops, "ops", ops)
    if COMPILED is not None and compiled and (flat or isinstance(ops, list)):
        limit = None if capacity_bytes is None or capacity_bytes >= _NO_LIMIT else max(0, int(capacity_bytes))
        total = device_total_bytes or _DEFAULT_DEVICE_BYTES
        try:
            r = COMPILED.replay(ops, limit, cfg.large_segment_bytes, bool(cfg.expandable_segments), total + total // 8,
                                large_addresses == "up", *((cancel,) if cancel is not None and flat else ()))
        except OverflowError:
            pass  # sizes past 64 bits (a request of more than 2**56 bytes): the model's exact integers
        else:
            return None if r is None else ReplayStats(*r, compiled=True)
    if flat:
        ops = ops.ops
    model = CachingAllocatorModel(capacity_bytes, config=cfg, on_oom="raise", device_total_bytes=device_total_bytes,
                                  large_addresses=large_addresses)
    index = model.run(ops)
    return ReplayStats(index, *(getattr(model, k) for k in _STATS))


def replay_both_orders(stream, capacity_bytes: int | None = None, *,
                       device_total_bytes: int | None = None) -> tuple[ReplayStats, ReplayStats | None] | None:
    """:func:`replay_ops` of an estimator stream under the default setting in both orders of new large segments'
    addresses at once, ``(down, up)``: the compiled replay runs the second order on a thread of its own beside
    the first (``_replay.c``'s ``replay_pair``: two cores make the pair cost about one replay), and stops it when
    the first runs out of memory (``up`` is then None, unless it was done by then). None where that cannot be
    (no compiled replay, or ``stream`` is not the compiled stream): replay the orders one after the other."""
    if COMPILED is None or not hasattr(COMPILED, "replay_pair"):
        return None
    try:
        memoryview(stream).release()
    except TypeError:
        return None
    limit = None if capacity_bytes is None or capacity_bytes >= _NO_LIMIT else max(0, int(capacity_bytes))
    total = device_total_bytes or _DEFAULT_DEVICE_BYTES
    try:
        down, up = COMPILED.replay_pair(stream, limit, AllocatorConfig().large_segment_bytes, total + total // 8)
    except OverflowError:
        return None  # sizes past 64 bits: replay_ops falls back to the model's exact integers
    return ReplayStats(*down, compiled=True), (None if up is None else ReplayStats(*up, compiled=True))
