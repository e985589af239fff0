"""The estimate's event stream: the reference run's allocations and frees, in order, and their replay.

The estimator describes a run as a :class:`Stream`: every tensor it counts is one ``alloc`` (bytes and the
component it belongs to) and, unless it lives to the end, one ``free``; ``phase`` marks where forward,
backward, the optimizer step, prefill and decode begin, and ``reset`` is ``torch.cuda.reset_peak_memory_stats``
after the warm-up step (as :mod:`memfit.measurer.engine` does). :func:`replay` walks the stream twice:

- by the tensors' own bytes: peak allocated, the component split at that moment and each phase's peak
  (what the closed-form moments of :mod:`memfit.estimator` always counted);
- through the caching-allocator model (:mod:`memfit.allocator`): peak reserved and, with a card's capacity,
  whether the run completes or which request fails.

Pure Python, no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from dataclasses import replace as replace_
from itertools import accumulate, compress
from operator import itemgetter

from ..compiled import load as load_compiled

__all__ = ["Stream", "PyStream", "build", "ReplayResult", "replay", "replay_both", "CUDA_CONTEXT_BYTES", "CUDA_CONTEXT_INFER_BYTES",
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

#: ``MEMFIT_FULL_REPLAY=1`` turns every shortcut of this module off (the fast replay loop, the replays skipped
#: or reused): each replay walks the stream event by event through ``malloc``/``free``, as the reference that
#: ``validation/check_fast_replay.py`` compares the fast path with. Read once, at import; tests flip the module
#: attribute.
_FULL_REPLAY = os.environ.get("MEMFIT_FULL_REPLAY", "") not in ("", "0")


#: the compiled stream (None: :class:`PyStream` only)
_COMPILED = load_compiled("memfit.estimator._events")


#: bitsandbytes' LLM.int8 matmul runs through its own cuBLASLt context (``functional.CUBLAS_Context.get_context``:
#: ``lib.get_context()``, made at the first int8 matmul and kept), with its int8 kernels: memory outside PyTorch's
#: allocator that ``nvidia-smi`` counts. Device total minus peak reserve, h100-quant.json: int8 training 816.8 MiB
#: (both runs) against 766.8 for the unquantized median, int8 generation 764.8 against 694.8.
BNB_INT8_CONTEXT_BYTES = {"train": 50 << 20, "infer": 70 << 20}


def cuda_context_bytes(task: str = "train", quantization: str = "none") -> int:
    """The CUDA context and loaded kernels, as ``nvidia-smi`` counts them beyond PyTorch's reserve (with
    bitsandbytes' own cuBLASLt context where the weights are LLM.int8)."""
    base = CUDA_CONTEXT_INFER_BYTES if task != "train" else CUDA_CONTEXT_BYTES
    if quantization == "int8":
        base += BNB_INT8_CONTEXT_BYTES["train" if task == "train" else "infer"]
    return base


class PyStream:
    """Allocations and frees of one run, in order. ``alloc`` returns a handle to pass to ``free``.

    The Python version: :data:`Stream` is the compiled one of ``_events.c`` where it is built (the same methods
    and results, operations kept as flat integers instead of tuples), this class elsewhere.

    ``ops`` is the stream as the allocator model replays it: ``(0, handle, bytes, component)``, ``(1, handle)``,
    ``(2, phase name)``, ``(3,)`` (the reset). Handles count the allocations from 0. Alongside, for
    :func:`account`, the stream keeps what a walk by tensor bytes needs without looking at every op again: each
    handle's bytes and component, each op's change of the live bytes, and where the phase marks and resets are.
    Build a stream through these methods only (the side lists follow ``ops``)."""

    __slots__ = ("ops", "_n", "phase_name", "accounted", "_size", "_comp", "_delta", "_marks", "_resets")

    def __init__(self) -> None:
        self.accounted: ReplayResult | None = None
        self.ops: list[tuple] = []
        self._n = 0
        self.phase_name = ""
        self._size: list[int] = []  # by handle
        self._comp: list[str] = []  # by handle
        self._delta: list[int] = []  # by op: + bytes (alloc), - bytes (free), 0 (mark, reset)
        self._marks: list[int] = []  # op index of each phase mark
        self._resets: list[int] = []  # op index of each reset

    def alloc(self, nbytes: float, component: str) -> int:
        """One tensor of ``nbytes`` (rounded to whole bytes; a zero-byte tensor is skipped: handle -1)."""
        n = int(round(nbytes))
        if n <= 0:
            return -1
        h = self._n
        self._n = h + 1
        self.ops.append((_ALLOC, h, n, component))
        self._size.append(n)
        self._comp.append(component)
        self._delta.append(n)
        return h

    def free(self, handle: int) -> None:
        if handle >= 0:
            self.ops.append((_FREE, handle))
            self._delta.append(-self._size[handle])

    def alloc_all(self, sizes, component: str) -> list[int]:
        """:meth:`alloc` of each of ``sizes``, in order; their handles (-1 for a zero-byte one)."""
        return [self.alloc(x, component) for x in sizes]

    def free_all(self, handles) -> None:
        ops, delta, size = self.ops, self._delta, self._size
        for h in handles:
            if h >= 0:
                ops.append((_FREE, h))
                delta.append(-size[h])

    def regrow(self, held: list[list[int]], sizes: list[list[float]], component: str) -> None:
        """For each ``i`` in order: allocate the tensors of ``sizes[i]``, then free those of ``held[i]``, which
        become the new ones (``torch.cat`` growing a cache: the longer tensor made while the old one is
        alive). The same stream as :meth:`alloc` and :meth:`free_all` called so, in one loop."""
        ops, size, comp, delta = self.ops, self._size, self._comp, self._delta
        h = self._n
        for i, want in enumerate(sizes):
            new = []
            for x in want:
                n = int(round(x))
                if n <= 0:
                    new.append(-1)
                    continue
                ops.append((_ALLOC, h, n, component))
                size.append(n)
                comp.append(component)
                delta.append(n)
                new.append(h)
                h += 1
            for old in held[i]:
                if old >= 0:
                    ops.append((_FREE, old))
                    delta.append(-size[old])
            held[i] = new
        self._n = h

    def mark(self) -> tuple[int, int]:
        """Where the stream is: (ops so far, handles so far), the start of a stretch for :meth:`repeat`."""
        return len(self.ops), self._n

    def repeat(self, start: tuple[int, int], outside: dict[int, int]) -> int | None:
        """Append the stretch from ``start`` (a :meth:`mark`) to the end again, as the code that made it would
        emit it once more for the next of several identical layers: each tensor it made is made again (a new
        handle, as many allocations later), each tensor from before the stretch that it frees is replaced by
        ``outside[handle]`` (which must have the same bytes). Returns that handle offset, or None with nothing
        appended when the stretch frees a tensor from before it that ``outside`` does not map (or maps to one of
        other bytes), or holds a phase mark or reset. The result is the stream the code would have built."""
        o0, h0 = start
        if (self._marks and self._marks[-1] >= o0) or (self._resets and self._resets[-1] >= o0):
            return None
        ops, size = self.ops, self._size
        h1 = self._n
        d = h1 - h0
        n_stretch = len(ops) - o0
        for h, m in outside.items():
            if m < 0 or size[h] != size[m]:
                return None
        try:
            new = [(_ALLOC, op[1] + d, op[2], op[3]) if op[0] == _ALLOC else
                   (_FREE, op[1] + d if op[1] >= h0 else outside[op[1]]) for op in ops[o0:]]
        except KeyError:
            return None
        ops.extend(new)
        size.extend(size[h0:h1])
        self._comp.extend(self._comp[h0:h1])
        self._delta.extend(self._delta[o0:o0 + n_stretch])
        self._n = h1 + d
        return d

    def repeat_map(self, start: tuple[int, int], keys: tuple[list[int], ...], values: tuple[list[int], ...],
                   lists: tuple[list[int], ...], sub_from: int, sub_to: int) -> tuple | None:
        """:meth:`repeat` with ``outside`` given as the handles of ``keys``' lists mapped to those of ``values``'
        (position by position; a key of -1 maps nothing), and ``lists`` (handle lists of the stretch's template)
        returned for the copy: ``(offset, *lists)``, each handle ``sub_from`` replaced by ``sub_to``, every other
        handle >= 0 shifted by the offset, -1 kept. None as :meth:`repeat`."""
        flat_keys, flat_values = [h for k in keys for h in k], [h for v in values for h in v]
        if len(flat_keys) != len(flat_values):
            raise ValueError("repeat_map: as many keys as values")
        outside = dict(zip(flat_keys, flat_values))
        outside.pop(-1, None)
        d = self.repeat(start, outside)
        if d is None:
            return None
        return (d, *([sub_to if h == sub_from else (h + d if h >= 0 else -1) for h in t] for t in lists))

    def again(self, start: tuple[int, int], end: tuple[int, int]) -> bool | None:
        """Append the stretch between two :meth:`mark` s again, as a later pass of the code that made it emits it
        (a training step after the first): each tensor the stretch frees is made anew (new handles, in order),
        each it never frees is left out (it persists: made once, as the optimizer states and the cuBLAS
        workspaces are), its phase marks come again. True; or None with nothing appended when the stretch frees
        a tensor from outside it or holds a reset. The result is the stream the code would have built."""
        (o0, h0), (o1, h1) = start, end
        if any(o0 <= r < o1 for r in self._resets):
            return None
        stretch = self.ops[o0:o1]
        freed = set()
        for op in stretch:
            if op[0] == _FREE:
                if not h0 <= op[1] < h1:
                    return None
                freed.add(op[1])
        new: dict[int, int] = {}
        for op in stretch:
            kind = op[0]
            if kind == _ALLOC:
                if op[1] in freed:
                    new[op[1]] = self.alloc(op[2], op[3])
            elif kind == _FREE:
                self.free(new[op[1]])
            else:
                self.phase(op[1])
        return True

    def extend(self, a: tuple[int, int], b: tuple[int, int], end: tuple[int, int], count: int) -> int | None:
        """Append ``count`` more passes of a loop whose last two passes are the stretches ``a``-``b`` and
        ``b``-``end`` (three :meth:`mark` s, ``end`` the stream's end): each pass's operations are the last one's,
        its handles ``d`` further on (``d`` the handles one pass makes) and each allocation's bytes changed by
        as much as from the first stretch to the second (a size affine in the pass: decode's caches one token
        longer each step). The two stretches must be the same operations: the same kinds and components, each
        handle of the second the first's plus ``d`` (a pass frees what the one before made), no phase mark or
        reset. Returns the handle offset of the last pass from the second stretch (``count * d``), or None with
        nothing appended where the stretches differ so or a size would reach zero bytes. The caller vouches that
        each size is affine over the passes; the result is then the stream the loop would have built."""
        (oa, ha), (ob, hb), (oe, he) = a, b, end
        ops = self.ops
        d = hb - ha
        if (oe, he) != (len(ops), self._n) or he - hb != d or d <= 0 or oe - ob != ob - oa or count < 0 or oa < 0:
            return None
        if any(r >= oa for r in self._marks[-1:] + self._resets[-1:]):
            return None
        plan = []  # per op of the second stretch: (alloc?, its bytes or freed handle, growth a pass, component)
        for x, y in zip(ops[oa:ob], ops[ob:oe]):
            if x[0] != y[0] or y[1] != x[1] + d:
                return None
            if y[0] == _ALLOC:
                if x[3] != y[3] or y[2] + count * (y[2] - x[2]) <= 0:
                    return None
                plan.append((True, y[2], y[2] - x[2], y[3]))
            else:
                plan.append((False, y[1], d, None))
        for k in range(1, count + 1):
            for is_alloc, base, step, c in plan:
                if is_alloc:
                    self.alloc(base + k * step, c)  # its handle is the next one: the second's plus k * d
                else:
                    self.free(base + k * step)
        return count * d

    def phase(self, name: str) -> None:
        self.phase_name = name
        self._marks.append(len(self.ops))
        self.ops.append((_PHASE, name))
        self._delta.append(0)

    def reset_peaks(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: the peaks that count start here."""
        self._resets.append(len(self.ops))
        self.ops.append((_RESET,))
        self._delta.append(0)

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def handles(self) -> int:
        """Allocations made so far."""
        return self._n

    def op(self, i: int) -> tuple:
        """Operation ``i``."""
        return self.ops[i]

    def phase_at(self, i: int) -> str:
        """The phase operation ``i`` is in: the name of the last phase mark before it ("" when none)."""
        return _phase_at(self.ops, i)


#: the stream the estimator builds: the compiled one where it is built, else :class:`PyStream`. The compiled
#: one holds whole bytes below 2**62 (a larger tensor raises OverflowError: :func:`build` then uses PyStream).
Stream = _COMPILED.Stream if _COMPILED is not None else PyStream


def build(make):
    """``make(stream)`` on a new :data:`Stream`, or on a :class:`PyStream` where a size passes what the
    compiled one holds (2**62 bytes: the jobs past any card that bad input can ask for); the stream."""
    s = Stream()
    if Stream is PyStream:
        make(s)
        return s
    try:
        make(s)
    except OverflowError:
        s = PyStream()
        make(s)
    return s


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
    limit_reached: bool = False
    """A replay under a limit: whether a request would have taken the reserve past it (the allocator then frees
    its cache and retries, ``num_alloc_retries``, or fails). When it never did the limit changed nothing: the run
    is the unlimited one, and it is the run under any larger limit too (the limit enters only that check)."""
    events: int = 0
    extras: dict = field(default_factory=dict)


def account(stream: Stream) -> ReplayResult:
    """Walk the stream by tensor bytes: peak allocated (after the last reset), its components, phase peaks."""
    if _FULL_REPLAY:
        return _account_full(stream)
    return _account_fast(stream)


def _account_fast(stream: Stream) -> ReplayResult:
    """:func:`account` with the walk done by list operations instead of one Python step per event: the live
    bytes after each event are a running sum (``itertools.accumulate``) of the events' signed sizes (kept by the
    stream as it is built); the peak is the first maximum of that sum after the last reset, each phase's peak
    the maximum over its stretch, the components those of the tensors alive at the peak. Same results as
    :func:`_account_full`, field by field.

    Without a reset the peak is the first maximum over all events, not only the allocations: a free or a mark
    never raises the live bytes, so the first event that reaches the maximum is an allocation (the live bytes
    before the first allocation are 0, and every allocation is at least one byte)."""
    if not isinstance(stream, PyStream):  # the compiled stream's own walk (_events.c); None: past 64 bits
        got = stream.account()
        if got is None:
            return _account_full(stream)
        peak, _, peak_phase, phases, comps = got
        return ReplayResult(peak_allocated_bytes=max(peak, 0), components=comps, peak_phase=peak_phase,
                            phases=phases, events=len(stream))
    ops = stream.ops
    n_ops = len(ops)
    delta = stream._delta
    if len(delta) != n_ops:  # ops added to the list directly, not through the stream's methods
        return _account_full(stream)
    live = list(accumulate(delta))
    resets = stream._resets
    if resets:
        r = reset_at = resets[-1]  # the last reset: the peak is its live bytes or a later maximum
        peak = max(live[r:])
        peak_at = live.index(peak, r)
    else:
        r, reset_at = 0, -1
        if stream._n:
            peak = max(live)
            peak_at = live.index(peak)
        else:
            peak, peak_at = -1, -1
    marks = stream._marks
    # phase peaks: each stretch from a phase mark to the next counts the live bytes at its mark and after each
    # allocation in it; the stretch the reset falls in counts only its allocations after the reset
    phases: dict[str, int] = {}
    bounds = [0] + marks + [n_ops]
    names = [""] + [ops[i][1] for i in marks]
    peak_phase = ""
    for j in range(len(names)):
        start, end = bounds[j], bounds[j + 1]
        if end <= r and reset_at >= 0:
            continue
        name = names[j]
        if start <= peak_at < end:
            peak_phase = name
        if name == "":
            continue  # the stretch before the first mark (or a mark without a name): not reported
        if reset_at >= 0 and start <= r:
            # only the allocations after the reset count here (not the live bytes at the reset)
            # (an allocation is the one event whose delta is > 0: a free's is < 0, a mark's 0)
            best = max(compress(live[r + 1:end], map((0).__lt__, delta[r + 1:end])), default=-1)
        else:
            # the mark and the allocations: a free or a mark never raises the live bytes, so the stretch's
            # maximum is one of them
            best = max(live[start:end])
        if best >= 0 and best > phases.get(name, -1):
            phases[name] = best
    comps: dict[str, int] = {}
    if peak_at >= 0:
        nh = 0  # the handles allocated by the peak: the last allocation at or before it, plus one
        for i in range(peak_at, -1, -1):
            op = ops[i]
            if op[0] == _ALLOC:
                nh = op[1] + 1
                break
        alive = [True] * nh
        for h in map(itemgetter(1), compress(ops[:peak_at + 1], map((0).__gt__, delta[:peak_at + 1]))):  # frees
            alive[h] = False
        size, comp = stream._size, stream._comp
        for h in compress(range(nh), alive):
            c = comp[h]
            comps[c] = comps.get(c, 0) + size[h]
        comps = {c: comps[c] for c in dict.fromkeys(comp[:nh]) if comps.get(c)}
    return ReplayResult(peak_allocated_bytes=max(peak, 0), components=comps, peak_phase=peak_phase,
                        phases=phases, events=n_ops)


def _account_full(stream: Stream) -> ReplayResult:
    """:func:`account`, event by event (the reference)."""
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
           accounted: ReplayResult | None = None, uncapped: ReplayResult | None = None,
           large_addresses: str = "down", cancel: bytearray | None = None) -> ReplayResult | None:
    """Account the stream, then replay it through the caching-allocator model.

    With ``capacity_bytes`` (the card less the CUDA context) the allocator frees its cached segments and
    retries before it fails, as PyTorch's does; the first request it cannot serve ends the replay
    (``completed`` False, with the request, its component and its phase).

    ``uncapped``: this stream's replay without a limit (same allocator setting), when the caller has it. Under
    a limit the allocator does exactly what it does without one until a new segment would pass the limit
    (``alloc_block``'s check is the only place the limit enters), and without a limit the reserve only grows,
    up to its peak: so when that peak is within ``capacity_bytes`` the capped run is the uncapped one, and it
    is returned (a copy) without a second replay. Not with expandable segments: the uncapped replay is then the
    stand-in of :func:`_replay_expandable`, the capped one the allocator model's own mode.

    ``large_addresses``: the order of new large segments' addresses (:class:`memfit.allocator.CachingAllocatorModel`;
    "up" is the other order a driver may give, which breaks ties between equal-size cached blocks the other way).
    Not used with expandable segments (one segment per pool).

    ``cancel``: a bytearray whose first byte another thread may set to stop the replay (the compiled one, which
    runs without the GIL): None is then returned."""
    if capacity_bytes is not None:
        capacity_bytes = max(0, int(capacity_bytes))  # a card smaller than the CUDA context: nothing fits
    if (uncapped is not None and not _FULL_REPLAY and uncapped.completed and not expandable_segments
            and (capacity_bytes is None or uncapped.peak_reserved_bytes <= capacity_bytes)):
        return replace_(uncapped, components=dict(uncapped.components), phases=dict(uncapped.phases), extras={})
    res = _accounted_copy(stream, accounted)
    if expandable_segments and capacity_bytes is None:
        # uncapped, the stand-in's perfect page reuse; under a card's limit the allocator model's expandable
        # mode, which unmaps free pages only when a request would pass the limit (as the real one does)
        _replay_expandable(stream, res, capacity_bytes)
    else:
        if not _replay_default(stream, res, capacity_bytes, expandable_segments, large_addresses, cancel):
            return None
    return res


def _replay_default(stream: Stream, res: ReplayResult, capacity_bytes: int | None,
                    expandable_segments: bool = False, large_addresses: str = "down",
                    cancel: bytearray | None = None) -> bool:
    """Fill ``res`` from the allocator model's run; False when ``cancel`` stopped it."""
    from ..allocator import AllocatorConfig, AllocatorOutOfMemory, CachingAllocatorModel, replay_ops

    config = AllocatorConfig(expandable_segments=expandable_segments)
    if not _FULL_REPLAY:
        # compiled where it is built: the compiled stream's operations read as they are kept (its buffer)
        alloc = replay_ops(stream if not isinstance(stream, PyStream) else stream.ops, capacity_bytes,
                           config=config, large_addresses=large_addresses, cancel=cancel)
        if alloc is None:
            return False
        _fill(res, alloc, stream, capacity_bytes)
        return True
    alloc = CachingAllocatorModel(capacity_bytes, config=config, on_oom="raise", large_addresses=large_addresses)
    blocks: dict[int, object] = {}
    phase = ""
    malloc, free = alloc.malloc, alloc.free
    for op in stream.ops:
        kind = op[0]
        if kind == _ALLOC:
            try:
                blocks[op[1]] = malloc(op[2])
                failed = False
            except AllocatorOutOfMemory:
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
    res.limit_reached = capacity_bytes is not None and (alloc.num_alloc_retries > 0 or not res.completed)
    return True


def _accounted_copy(stream: Stream, accounted: ReplayResult | None = None) -> ReplayResult:
    """A fresh copy of the stream's accounting (``accounted``, else the one it keeps, else made now), for a
    replay to complete."""
    accounted = accounted or stream.accounted
    if accounted is None:
        return account(stream)
    return replace_(accounted, components=dict(accounted.components), phases=dict(accounted.phases), extras={})


def _fill(res: ReplayResult, alloc, stream: Stream, capacity_bytes: int | None) -> None:
    """``res`` (the stream's accounting) completed with the compiled replay's figures (a ReplayStats)."""
    i = alloc.index
    if i >= 0:
        op = stream.op(i)
        res.completed = False
        res.failed_request_bytes, res.failed_component = op[2], op[3]
        res.failed_phase = stream.phase_at(i)
        res.allocated_at_failure_bytes = alloc.allocated
        res.reserved_at_failure_bytes = alloc.reserved
    res.peak_reserved_bytes = alloc.peak_reserved
    res.limit_reached = capacity_bytes is not None and (alloc.num_alloc_retries > 0 or not res.completed)


def replay_both(stream: Stream, capacity_bytes: int) -> tuple[ReplayResult, ReplayResult | None] | None:
    """:func:`replay` of the stream under ``capacity_bytes`` with the default setting in both orders of new
    large segments' addresses, ``(down, up)``, the second on a thread beside the first
    (:func:`memfit.allocator.replay_both_orders`); ``up`` is None when the first ran out of memory before the
    second was done. None where the pair cannot run at once (no compiled replay or stream, or the full replay
    that ``MEMFIT_FULL_REPLAY`` asks for): call :func:`replay` for each order."""
    from ..allocator import replay_both_orders

    if _FULL_REPLAY or isinstance(stream, PyStream):
        return None
    capacity_bytes = max(0, int(capacity_bytes))
    got = replay_both_orders(stream, capacity_bytes)
    if got is None:
        return None
    out = []
    for alloc in got:
        if alloc is None:
            out.append(None)
            continue
        res = _accounted_copy(stream)
        _fill(res, alloc, stream, capacity_bytes)
        out.append(res)
    return out[0], out[1]


def _phase_at(ops: list[tuple], end: int) -> str:
    """The phase ``ops[end]`` is in: the name of the last phase mark before it."""
    for i in range(end - 1, -1, -1):
        if ops[i][0] == _PHASE:
            return ops[i][1]
    return ""


def _replay_expandable(stream: Stream, res: ReplayResult, capacity_bytes: int | None) -> None:
    """The uncapped reserve under ``expandable_segments:True``: large blocks live in one segment that grows page
    by page, so the reserve is the live large blocks rounded up to whole 2 MiB pages plus the small pool's 2 MiB
    segments (what the allocator reaches after it unmaps free pages). Under a card's limit the replay uses the
    allocator model's own expandable mode instead (:func:`replay`)."""
    from ..allocator import SMALL_REQUEST_BYTES, SMALL_SEGMENT_BYTES, round_size

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
