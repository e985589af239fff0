"""The allocation tracker: every storage an ATen op creates, when it dies, what it is.

A ``TorchDispatchMode`` sees the output of every ATen op (under ``FakeTensorMode`` these are fake tensors: the
shapes and dtypes a real run has, no data). Each new storage is one request to the caching-allocator model
(:mod:`memfit.allocator`), counted once however many views share it; a ``weakref`` on the storage
object (PyTorch keeps one Python object per live storage) frees the block the moment the last tensor using
it dies - a saved activation when autograd releases it in backward, a temporary when its Python name goes.

Every allocation is a :class:`Record` with the event at which it was born and died, so the bytes alive at
any event, by what they are, can be summed afterwards. What a storage *is* is set when it is created
(``weights`` while loading, ``temporaries`` in forward and backward, vocab-sized tensors ``logits_and_loss``,
autocast's 16-bit copies of fp32 weights ``autocast_cache``) and refined at phase boundaries by the engine
(forward temporaries still alive when backward starts were saved for it: ``activations``; ``.grad`` tensors:
``gradients``; the optimizer's state: ``optimizer_states``; the batch: ``inputs``; the KV cache: ``kv_cache``).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterable

from ..allocator import CachingAllocatorModel

__all__ = ["Record", "Tracker", "CUBLAS_WORKSPACE_BYTES", "TIMELINE_POINTS"]

from ..estimator.states import CUBLAS_HANDLE_WORKSPACE_BYTES as CUBLAS_WORKSPACE_BYTES  # noqa: E402

_CUBLAS_DOC = """cuBLAS workspace PyTorch allocates through the caching allocator for each (handle, stream) on first use
and keeps: ``CublasHandlePool.cpp`` ``getChosenWorkspaceSize`` defaults to 4096 x 8 KiB = 32 MiB on sm90
(H100). The forward runs on the caller's thread and the backward on autograd's device thread, each with
its own handle, so a training step holds two; inference holds one. Calibrated against measurements."""

TIMELINE_POINTS = 2000
"""Most points kept in ``extras["timeline"]``."""

_GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "dot", "vdot", "_addmm_activation",
             "_grouped_mm", "_scaled_mm", "addr")
"""Ops that run cuBLAS (composites such as ``linear`` and ``matmul`` reach the tracker decomposed into these)."""


def _softmax_tmp(grad: Any, dim: int) -> bool:
    """Whether CUDA's ``_softmax_backward_data`` of ``grad`` over ``dim`` makes ``grad * output`` first."""
    from ..estimator.layers import softmax_backward_scratch

    d = dim % grad.dim() if grad.dim() else 0
    innermost = all(n == 1 for n in grad.shape[d + 1:])
    return softmax_backward_scratch(int(grad.shape[d]) if grad.dim() else 1, grad.element_size(), innermost)


class Record:
    """One allocation: its block, when it lived (events), what it is."""

    __slots__ = ("block_bytes", "nbytes", "category", "born", "died", "block", "phase", "shape", "dtype", "op")

    def __init__(self, block: Any, nbytes: int, category: str, born: int, phase: str, shape: tuple = (),
                 dtype: str = "", op: str = "") -> None:
        self.block = block
        self.block_bytes = block.size
        self.nbytes = nbytes
        self.category = category
        self.born = born
        self.died: int | None = None
        self.phase = phase
        self.shape = shape
        self.dtype = dtype
        self.op = op

    def describe(self) -> dict[str, Any]:
        return {"bytes": self.block_bytes, "category": self.category, "shape": list(self.shape),
                "dtype": self.dtype, "op": self.op, "phase": self.phase}


class Tracker:
    """Allocation bookkeeping plus the dispatch mode that feeds it (see :meth:`mode`)."""

    def __init__(self, torch: Any, *, cuda: bool = True, vocab_size: int = 0,
                 capacity_bytes: int | None = None, allocator_config: Any = None) -> None:
        self.torch = torch
        self.cuda = cuda
        # What the peaks and the timeline count: the allocator's blocks (CUDA) or the tensors' own bytes (a CPU
        # run has no caching allocator; this is what a tensor-level count on the CPU sees).
        self.metric = "allocated" if cuda else "requested"
        self.vocab_size = int(vocab_size or 0)
        self.sim = CachingAllocatorModel(capacity_bytes, config=allocator_config)
        self.records: list[Record] = []
        self.first_oom: dict | None = None
        self._live: dict[int, tuple[Record, Any]] = {}  # id(storage) -> (record, weakref)
        self.event = 0
        self.phase = "load"
        self.default_category = "weights"
        self.inference = False
        self.enabled = True
        # timeline: parallel lists (event, phase, allocated)
        self.tl_event: list[int] = []
        self.tl_phase: list[str] = []
        self.tl_alloc: list[int] = []
        # the measured window
        self.recording = False
        self.window_start_event = 0
        self.window_end_event: int | None = None
        self.peak = -1
        self.peak_event = 0
        self.peak_phase = ""
        self.peak_op = ""
        self.phase_peaks: dict[str, int] = {}
        self.load_peak = 0
        self.current_op = ""
        self._cublas_handles: set[str] = set()
        ops = torch.ops.aten
        self._to_copy = ops._to_copy.default
        self._cat = ops.cat.default
        self._lift = {ops.lift_fresh.default, ops.lift_fresh_copy.default}
        self._gemm = set()
        for name in _GEMM_OPS:
            packet = getattr(ops, name, None)
            if packet is not None:
                for ov in packet.overloads():
                    self._gemm.add(getattr(packet, ov))
        self.workspace_hooks: dict[Any, Callable[..., Iterable[int]]] = {}
        # .item() and bool(): _local_scalar_dense, or (under inference_mode, where the composites are not
        # decomposed before reaching the mode) item / is_nonzero.
        self._is_nonzero = ops.is_nonzero.default
        self.assumed_values = 0
        from torch._subclasses.fake_tensor import DataDependentOutputException

        self._data_dependent = DataDependentOutputException
        self._composite: dict[Any, bool] = {}
        self._item = {ops._local_scalar_dense.default, ops.item.default, ops.is_nonzero.default}
        self._safe_softmax = ops._safe_softmax.default
        self._softmax_backward = ops._softmax_backward_data.default
        # ``.all()`` / ``.any()`` of a batch-wide condition: the reference batch has no padding, no
        # finished sequence and no inf, so "all" of such a test is True and "any" is False.
        self._reductions: dict[Any, bool] = {}
        for name, value in (("all", True), ("any", False)):
            packet = getattr(ops, name)
            for ov in packet.overloads():
                self._reductions[getattr(packet, ov)] = value

    # ------------------------------------------------------------------------------ dispatch mode
    def mode(self):
        """A fresh ``TorchDispatchMode`` that reports to this tracker (enter it inside ``FakeTensorMode``)."""
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        Tensor = self.torch.Tensor

        class _TrackAllocations(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in tracker._item:
                    known = getattr(args[0], "_memfit_value", None)
                    if known is None:
                        try:
                            return func(*args, **(kwargs or {}))  # a constant the fake mode still knows
                        except tracker._data_dependent:
                            known = tracker.fake_scalar(args[0])
                            if known is None:
                                raise
                    return bool(known) if func is tracker._is_nonzero else known
                if func is tracker._safe_softmax and tracker.cuda:
                    # the math attention kernel's softmax: on the device its CompositeExplicitAutograd kernel
                    # runs (fake tensors take the one-output meta kernel): ``softmax``, ``isneginf`` (bool), ``all``
                    # over the rows and ``where(masked_rows, 0, out, out=out)``, in place: the scores, the softmax
                    # and the bool mask at once (torch 2.13 attention.cpp ``_safe_softmax``, seen op by op with the
                    # profiler on the CPU; measured on the H200 under torch 2.11: the checkpointed QLoRA forward
                    # peaks 2.25 score-sized tensors above its layer, not 3.25)
                    x, dim = args[0], args[1]
                    with self:
                        out = tracker.torch.ops.aten._softmax.default(x, dim, False)
                        if len(args) > 2 and args[2] is not None:
                            out = out.to(args[2])
                        masked = tracker.torch.ops.aten.isneginf.default(x)
                        rows = tracker.torch.ops.aten.all.dim(masked, dim, True)
                        zero = tracker.torch.ops.aten.scalar_tensor.default(0.0, dtype=out.dtype, device=out.device)
                        tracker.torch.ops.aten.where.self_out(rows, zero, out, out=out)
                        del masked, rows, zero  # the kernel's locals, freed as it returns
                        return out
                scratch = None
                if func is tracker._softmax_backward and tracker.cuda and _softmax_tmp(args[0], args[2]):
                    # CUDA's softmax backward of rows the persistent kernel cannot take makes ``tmp = grad *
                    # output``, a gradient-sized temporary its kernel reads (softmax_backward_scratch); the CPU
                    # kernel (and the fake one) makes only the result. Under the math attention kernel that is one
                    # more score-sized tensor at the softmax backward, four with the saved probabilities, their
                    # gradient and the result (measured: the checkpointed QLoRA backward peaks there)
                    with self:
                        scratch = tracker.torch.ops.aten.mul.Tensor(args[0], args[1])
                if tracker._is_composite(func):
                    # Under inference_mode composite ops reach the mode whole; decompose them here, with this
                    # mode active, so the tensors they make inside are seen too (as on a real device).
                    with self:
                        out = func.decompose(*args, **(kwargs or {}))
                    if out is not NotImplemented:
                        return out
                out = func(*args, **(kwargs or {}))
                if func in tracker._reductions and isinstance(out, Tensor) and out.dim() == 0:
                    out._memfit_value = tracker._reductions[func]
                if tracker.enabled:
                    tracker.current_op = func
                    flat = out if isinstance(out, Tensor) else None
                    if flat is not None:
                        tracker._see(flat, func, args)
                    else:
                        for t in tree_flatten(out)[0]:
                            if isinstance(t, Tensor):
                                tracker._see(t, func, args)
                    if tracker.cuda and func in tracker._gemm:
                        tracker._cublas()
                    hook = tracker.workspace_hooks.get(func)
                    if hook is not None:
                        tracker.workspace(hook(args, kwargs or {}, out))
                del scratch  # the kernel's temporary goes as it returns
                return out

        return _TrackAllocations()

    def _is_composite(self, func: Any) -> bool:
        """Whether the device runs ``func`` as its ``CompositeImplicitAutograd`` decomposition: an op with a kernel
        of its own for the backend runs that instead (``silu_backward``, ``mish_backward``: one fused kernel on
        CUDA, the CPU build's registration standing for it; decomposed, SiLU's backward made six MLP-wide
        temporaries - traced: checkpointed QLoRA mistral-7b at 4 x 1024 tokens 5.4 % over, peaking there)."""
        known = self._composite.get(func)
        if known is None:
            has = self.torch._C._dispatch_has_kernel_for_dispatch_key
            try:
                known = has(func.name(), "CompositeImplicitAutograd") and not has(func.name(), "CPU")
            except (RuntimeError, AttributeError):
                known = False
            self._composite[func] = known
        return known

    def fake_scalar(self, t: Any) -> Any:
        """What ``.item()`` / ``bool()`` of fake tensor ``t`` answers, or None to let fake tensors refuse.

        Fake tensors hold no values. Where a value is read the trace answers as the reference run would:
        ``all``/``any`` of a condition over the batch as above; in the optimizer step, scalars (step counts,
        norms that scale the update) only change the numbers, not the memory, so they read as 1.
        """
        value = getattr(t, "_memfit_value", None)
        if value is not None:
            return value
        if t.dtype.is_complex:
            return None
        if self.phase == "optimizer_step" and t.dtype != self.torch.bool:
            return 1.0 if t.dtype.is_floating_point else 1
        if t.dtype == self.torch.bool and self.phase in ("load", "prefill", "decode", "end"):
            # generate()'s checks of the batch (right padding, pad tokens): the reference batch has none.
            self.assumed_values += 1
            return False
        return None

    # ------------------------------------------------------------------------------ allocation
    def _see(self, t: Any, func: Any, args: tuple) -> None:
        if t.device.type == "meta":
            return  # the flash/efficient kernels' philox seed and offset: host-side, or nothing
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # no storage: sparse, nested
        key = id(st)
        entry = self._live.get(key)
        if entry is not None:
            rec, ref = entry
            if ref() is st:
                n = st.nbytes()
                if n != rec.nbytes:  # resized in place: the allocator frees and mallocs
                    self._release(key, ref)
                    self._alloc(st, key, n, rec.category, tuple(t.shape), str(t.dtype), str(func))
                return
            self._release(key, ref)  # a dead storage whose id was reused before its callback ran
        n = st.nbytes()
        if n == 0:
            return
        if func in self._lift and self.phase == "optimizer_step":
            return  # torch.tensor(...) in the optimizer: AdamW's step counters live on the host
        self._alloc(st, key, n, self._category(t, func, args), tuple(t.shape), str(t.dtype), str(func))

    def _category(self, t: Any, func: Any, args: tuple) -> str:
        cat = self.default_category
        phase = self.phase
        if phase in ("load", "optimizer_step", "end"):
            return cat
        shape = t.shape
        if self.vocab_size and len(shape) >= 2 and shape[-1] == self.vocab_size:
            return "logits_and_loss"
        if func is self._to_copy and args and isinstance(args[0], self.torch.Tensor):
            src = self._record_of(args[0])
            if src is not None and src.category in ("weights", "lora_adapters"):
                return "autocast_cache"
        if self.inference and func is self._cat and args:
            parts = args[0]
            for p in parts:
                if not isinstance(p, self.torch.Tensor):
                    continue
                if p.numel() == 0:
                    return "kv_cache"  # DynamicLayer's first update: cat onto an empty tensor
                src = self._record_of(p)
                if src is not None and src.category == "kv_cache":
                    return "kv_cache"
        return cat

    def _alloc(self, st: Any, key: int, nbytes: int, category: str, shape: tuple = (), dtype: str = "",
               op: str = "") -> Record:
        ooms, allocated, reserved = self.sim.oom_requests, self.sim.allocated, self.sim.reserved
        block = self.sim.malloc(nbytes)
        self.event += 1
        rec = Record(block, nbytes, category, self.event, self.phase, shape, dtype, op)
        if self.sim.oom_requests != ooms and self.first_oom is None:
            # the first request the capped allocator refused (the run goes on past it, over the limit, so the
            # rest of the step is still traced): what a real run would have raised OutOfMemoryError on, with the
            # allocated and reserved bytes just before it
            self.first_oom = {"bytes": int(nbytes), "category": category, "phase": self.phase, "op": op,
                              "allocated_bytes": int(allocated), "reserved_bytes": int(reserved)}
        self.records.append(rec)
        ref = weakref.ref(st, lambda r, key=key: self._on_free(key, r)) if st is not None else None
        if st is not None:
            self._live[key] = (rec, ref)
        self._note()
        return rec

    def _on_free(self, key: int, ref: Any) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is ref:
            self._release(key, ref)

    def _release(self, key: int, ref: Any) -> None:
        rec, _ = self._live.pop(key)
        self._free_record(rec)

    def _free_record(self, rec: Record) -> None:
        if rec.died is not None:
            return
        self.sim.free(rec.block)
        self.event += 1
        rec.died = self.event
        rec.block = None
        self._note()

    def set_phase(self, name: str) -> None:
        """Enter phase ``name``; what is allocated now counts toward its peak."""
        self.phase = name
        if self.recording:
            now = self.current()
            if now > self.phase_peaks.get(name, -1):
                self.phase_peaks[name] = now

    def current(self) -> int:
        return self.sim.allocated if self.metric == "allocated" else self.sim.requested

    def _note(self) -> None:
        alloc = self.sim.allocated if self.metric == "allocated" else self.sim.requested
        self.tl_event.append(self.event)
        self.tl_phase.append(self.phase)
        self.tl_alloc.append(alloc)
        if self.recording:
            if alloc > self.peak:
                self.peak = alloc
                self.peak_event = self.event
                self.peak_phase = self.phase
                self.peak_op = str(self.current_op)
            if alloc > self.phase_peaks.get(self.phase, -1):
                self.phase_peaks[self.phase] = alloc
        elif self.phase == "load" and alloc > self.load_peak:
            self.load_peak = alloc

    def _record_of(self, t: Any) -> Record | None:
        try:
            entry = self._live.get(id(t.untyped_storage()))
        except (RuntimeError, NotImplementedError):
            return None
        return entry[0] if entry is not None else None

    def workspace(self, sizes: Iterable[int]) -> None:
        """Scratch a kernel takes and gives back before it returns (cuBLAS-free kernels' workspaces)."""
        recs = [self._alloc(None, 0, int(n), "temporaries", op=f"kernel scratch ({self.current_op})")
                for n in sizes if n > 0]
        for rec in reversed(recs):
            self._free_record(rec)

    def _cublas(self) -> None:
        handle = "backward" if self.phase == "backward" else "main"
        if handle in self._cublas_handles:
            return
        self._cublas_handles.add(handle)
        self._alloc(None, 0, CUBLAS_WORKSPACE_BYTES, "other", op=f"cuBLAS workspace ({handle} thread)")

    # ------------------------------------------------------------------------------ tagging
    def tag(self, tensors: Iterable[Any], category: str, only: tuple[str, ...] | None = None) -> int:
        """Set what the storages of ``tensors`` are; return their bytes. ``only``: retag only those
        currently in one of these categories."""
        total = 0
        seen: set[int] = set()
        for t in tensors:
            if t is None or not isinstance(t, self.torch.Tensor):
                continue
            rec = self._record_of(t)
            if rec is None or id(rec) in seen:
                continue
            seen.add(id(rec))
            if only is None or rec.category in only:
                rec.category = category
            total += rec.block_bytes
        return total

    def retag_live(self, born_after: int, old: str, new: str) -> None:
        """Every live storage born after event ``born_after`` that is ``old`` becomes ``new``."""
        for rec, _ in list(self._live.values()):
            if rec.born > born_after and rec.category == old:
                rec.category = new

    def live_records(self) -> list[Record]:
        return [rec for rec, _ in list(self._live.values())]

    # ------------------------------------------------------------------------------ window
    def start_window(self) -> None:
        """``reset_peak_memory_stats``: peaks from here on are the answer."""
        self.sim.reset_peaks()
        self.recording = True
        self.window_start_event = self.event
        self.peak = self.current()
        self.peak_event = self.event
        self.peak_phase = self.phase
        self.phase_peaks = {}

    def stop_window(self) -> None:
        self.recording = False
        self.window_end_event = self.event

    def components_at(self, event: int) -> dict[str, int]:
        """Bytes alive at ``event`` by category (their sum is ``memory_allocated`` then)."""
        out: dict[str, int] = {}
        for rec in self.records:
            if rec.born <= event and (rec.died is None or rec.died > event):
                out[rec.category] = out.get(rec.category, 0) + rec.block_bytes
        return out

    def largest_at(self, event: int, n: int = 10) -> list[dict[str, Any]]:
        """The ``n`` largest allocations alive at ``event``."""
        alive = [rec for rec in self.records if rec.born <= event and (rec.died is None or rec.died > event)]
        alive.sort(key=lambda r: -r.block_bytes)
        return [rec.describe() for rec in alive[:n]]

    def requested_at(self, event: int) -> int:
        """Bytes requested (unrounded) alive at ``event``: what a tensor-level count on the CPU sees."""
        return sum(rec.nbytes for rec in self.records
                   if rec.born <= event and (rec.died is None or rec.died > event))

    def timeline(self, start: int, end: int | None, points: int = TIMELINE_POINTS) -> list[list[Any]]:
        """``[event, phase, allocated_bytes]`` from ``start`` to ``end``, at most ``points`` of them: each
        bucket keeps its highest point, so the peak is always there."""
        ev, ph, al = self.tl_event, self.tl_phase, self.tl_alloc
        from bisect import bisect_left, bisect_right

        i0 = bisect_left(ev, start)
        i1 = len(ev) if end is None else bisect_right(ev, end)
        n = i1 - i0
        if n <= 0:
            return []
        if n <= points:
            return [[ev[i] - start, ph[i], al[i]] for i in range(i0, i1)]
        out = []
        step = n / points
        for b in range(points):
            lo = i0 + int(b * step)
            hi = min(i1, i0 + int((b + 1) * step)) or lo + 1
            best = max(range(lo, max(hi, lo + 1)), key=al.__getitem__)
            out.append([ev[best] - start, ph[best], al[best]])
        return out

    def close(self) -> None:
        """Stop counting (storages dying after the trace must not touch the model)."""
        self.enabled = False
        self._live.clear()
