"""The estimate's event stream: the reference run's allocations and frees, in order, and their replay.

The estimator describes a run as a :class:`Stream`: every tensor it counts is one ``alloc`` (bytes and the
component it belongs to) and, unless it lives to the end, one ``free``; ``phase`` marks where forward,
backward, the optimizer step, prefill and decode begin, and ``reset`` is ``torch.cuda.reset_peak_memory_stats``
after the warm-up step (as :mod:`memfit.measurer.engine` does). :func:`replay` walks the stream twice:

- by the tensors' own bytes: peak allocated, the component split at that moment and each phase's peak
  (what the closed-form moments of :mod:`memfit.estimator` always counted);
- through the caching-allocator model (:mod:`memfit.allocator`; until that lands, the trace engine's
  :class:`memfit.tracer.allocator.CachingAllocatorModel`): peak reserved and, with a card's capacity, whether
  the run completes or which request fails.

Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as replace_

__all__ = ["Stream", "ReplayResult", "replay", "CUDA_CONTEXT_BYTES", "CUDA_CONTEXT_INFER_BYTES",
           "cuda_context_bytes", "EXPANDABLE_PAGE_BYTES"]

#: nvidia-smi's process total minus PyTorch's peak reserve: the CUDA context plus the kernels loaded (cuBLAS,
#: cuDNN, PyTorch's own). Training loads the backward and optimizer kernels too. The medians of
#: ``device_total - peak_reserved`` over the measured records (validation/records, H100 80GB HBM3, driver
#: 580.159.04, torch 2.11.0+cu130); the one place memfit defines it.
CUDA_CONTEXT_BYTES = 767 << 20
CUDA_CONTEXT_INFER_BYTES = 695 << 20

#: Expandable segments map physical memory in pages of this size (``kLargeBuffer``, 2 MiB on CUDA).
EXPANDABLE_PAGE_BYTES = 2 << 20

_ALLOC, _FREE, _PHASE, _RESET = 0, 1, 2, 3


def cuda_context_bytes(task: str = "train") -> int:
    """The CUDA context and loaded kernels, as ``nvidia-smi`` counts them beyond PyTorch's reserve."""
    return CUDA_CONTEXT_INFER_BYTES if task != "train" else CUDA_CONTEXT_BYTES


class Stream:
    """Allocations and frees of one run, in order. ``alloc`` returns a handle to pass to ``free``."""

    __slots__ = ("ops", "_n", "phase_name", "accounted")

    def __init__(self) -> None:
        self.accounted: ReplayResult | None = None
        self.ops: list[tuple] = []
        self._n = 0
        self.phase_name = ""

    def alloc(self, nbytes: float, component: str) -> int:
        """One tensor of ``nbytes`` (rounded to whole bytes; a zero-byte tensor is skipped: handle -1)."""
        n = int(round(nbytes))
        if n <= 0:
            return -1
        h = self._n
        self._n += 1
        self.ops.append((_ALLOC, h, n, component))
        return h

    def free(self, handle: int) -> None:
        if handle >= 0:
            self.ops.append((_FREE, handle))

    def free_all(self, handles) -> None:
        for h in handles:
            if h >= 0:
                self.ops.append((_FREE, h))

    def phase(self, name: str) -> None:
        self.phase_name = name
        self.ops.append((_PHASE, name))

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: the peaks that count start here."""
        self.ops.append((_RESET,))

    def __len__(self) -> int:
        return len(self.ops)


@dataclass
class ReplayResult:
    peak_allocated_bytes: int
    """Largest sum of live tensors' bytes after the last reset."""
    components: dict[str, int]
    """Live bytes by component at that moment."""
    peak_phase: str
    phases: dict[str, int]
    """Peak of live tensor bytes within each phase (after the reset)."""
    peak_reserved_bytes: int = 0
    """The allocator model's peak reserve (over the whole run: segments are kept from the warm-up on)."""
    completed: bool = True
    """False when a request could not be served within ``capacity_bytes``."""
    failed_request_bytes: int = 0
    failed_component: str = ""
    failed_phase: str = ""
    allocated_at_failure_bytes: int = 0
    reserved_at_failure_bytes: int = 0
    events: int = 0
    extras: dict = field(default_factory=dict)


def _allocator_classes():
    """The allocator package when it is there, else the trace engine's model (same malloc/free API)."""
    try:
        from ..allocator import AllocatorConfig, AllocatorOutOfMemory, CachingAllocatorModel  # type: ignore

        return CachingAllocatorModel, AllocatorConfig, AllocatorOutOfMemory
    except ImportError:
        from ..tracer.allocator import CachingAllocatorModel

        return CachingAllocatorModel, None, None


def account(stream: Stream) -> ReplayResult:
    """Walk the stream by tensor bytes: peak allocated (after the last reset), its components, phase peaks."""
    ops = stream.ops
    last_reset = 0
    for i, op in enumerate(ops):
        if op[0] == _RESET:
            last_reset = i
    size: dict[int, tuple[int, str]] = {}
    by_comp: dict[str, int] = {}
    live = 0
    peak = -1
    peak_at = -1
    peak_phase = ""
    phases: dict[str, int] = {}
    phase = ""
    counting = last_reset == 0
    for i, op in enumerate(ops):
        kind = op[0]
        if kind == _ALLOC:
            _, h, n, comp = op
            size[h] = (n, comp)
            live += n
            by_comp[comp] = by_comp.get(comp, 0) + n
            if counting:
                if live > phases.get(phase, -1):
                    phases[phase] = live
                if live > peak:
                    peak = live
                    peak_at = i
                    peak_phase = phase
        elif kind == _FREE:
            n, comp = size.pop(op[1])
            live -= n
            by_comp[comp] -= n
        elif kind == _PHASE:
            phase = op[1]
            if counting and live > phases.get(phase, -1):
                phases[phase] = live
        else:
            if i == last_reset:
                counting = True
                peak = live
                peak_at = i
                peak_phase = phase
                phases = {}
    phases.pop("", None)
    peak_comps = _components_at(ops, peak_at)
    return ReplayResult(peak_allocated_bytes=max(peak, 0), components={k: v for k, v in peak_comps.items() if v},
                        peak_phase=peak_phase, phases=phases, events=len(ops))


def _components_at(ops: list[tuple], end: int) -> dict[str, int]:
    """Live bytes by component just after ``ops[end]``."""
    size: dict[int, tuple[int, str]] = {}
    by_comp: dict[str, int] = {}
    for op in ops[:end + 1]:
        if op[0] == _ALLOC:
            size[op[1]] = (op[2], op[3])
            by_comp[op[3]] = by_comp.get(op[3], 0) + op[2]
        elif op[0] == _FREE:
            n, comp = size.pop(op[1])
            by_comp[comp] -= n
    return by_comp


def replay(stream: Stream, *, capacity_bytes: int | None = None, expandable_segments: bool = False,
           accounted: ReplayResult | None = None) -> ReplayResult:
    """Account the stream, then replay it through the caching-allocator model.

    With ``capacity_bytes`` (the card less the CUDA context) the allocator frees its cached segments and
    retries before it fails, as PyTorch's does; the first request it cannot serve ends the replay
    (``completed`` False, with the request, its component and its phase)."""
    if capacity_bytes is not None:
        capacity_bytes = max(0, int(capacity_bytes))  # a card smaller than the CUDA context: nothing fits
    accounted = accounted or stream.accounted
    res = account(stream) if accounted is None else replace_(accounted, components=dict(accounted.components),
                                                              phases=dict(accounted.phases), extras={})
    if expandable_segments and (capacity_bytes is None or _allocator_classes()[1] is None):
        # uncapped, the stand-in's perfect page reuse; under a card's limit the allocator model's expandable
        # mode, which unmaps free pages only when a request would pass the limit (as the real one does)
        _replay_expandable(stream, res, capacity_bytes)
    else:
        _replay_default(stream, res, capacity_bytes, expandable_segments)
    return res


def _replay_default(stream: Stream, res: ReplayResult, capacity_bytes: int | None,
                    expandable_segments: bool = False) -> None:
    Model, Config, OOM = _allocator_classes()
    if Config is not None:
        alloc = Model(capacity_bytes, config=Config(expandable_segments=expandable_segments), on_oom="raise")
    else:
        alloc = Model(capacity_bytes)
    blocks: dict[int, object] = {}
    phase = ""
    malloc, free = alloc.malloc, alloc.free
    for op in stream.ops:
        kind = op[0]
        if kind == _ALLOC:
            try:
                before = alloc.oom_requests if Config is None else 0
                blocks[op[1]] = malloc(op[2])
                failed = Config is None and alloc.oom_requests > before
            except Exception as exc:  # noqa: BLE001 - only the allocator's out-of-memory is expected here
                if OOM is None or not isinstance(exc, OOM):
                    raise
                failed = True
            if failed:
                res.completed = False
                res.failed_request_bytes, res.failed_component, res.failed_phase = op[2], op[3], phase
                res.allocated_at_failure_bytes = alloc.allocated
                res.reserved_at_failure_bytes = alloc.reserved
                break
        elif kind == _FREE:
            free(blocks.pop(op[1]))
        elif kind == _PHASE:
            phase = op[1]
    res.peak_reserved_bytes = alloc.peak_reserved


def _replay_expandable(stream: Stream, res: ReplayResult, capacity_bytes: int | None) -> None:
    """Stand-in for ``expandable_segments:True`` until :mod:`memfit.allocator` models it: large blocks live in
    one segment that grows page by page, so the reserve is the live large blocks rounded up to whole 2 MiB
    pages plus the small pool's 2 MiB segments (what the allocator reaches after it unmaps free pages)."""
    from ..tracer.allocator import SMALL_REQUEST_BYTES, SMALL_SEGMENT_BYTES, round_size

    size: dict[int, int] = {}
    large = small = 0
    peak = 0
    page = EXPANDABLE_PAGE_BYTES
    phase = ""
    for op in stream.ops:
        kind = op[0]
        if kind == _ALLOC:
            n = round_size(op[2])
            size[op[1]] = n
            if n <= SMALL_REQUEST_BYTES:
                small += n
            else:
                large += n
            reserved = -(-large // page) * page + -(-small // SMALL_SEGMENT_BYTES) * SMALL_SEGMENT_BYTES
            if capacity_bytes is not None and reserved > capacity_bytes:
                res.completed = False
                res.failed_request_bytes, res.failed_component, res.failed_phase = op[2], op[3], phase
                res.allocated_at_failure_bytes = large + small - n
                res.reserved_at_failure_bytes = peak
                break
            peak = max(peak, reserved)
        elif kind == _FREE:
            n = size.pop(op[1])
            if n <= SMALL_REQUEST_BYTES:
                small -= n
            else:
                large -= n
        elif kind == _PHASE:
            phase = op[1]
    res.peak_reserved_bytes = peak
