"""Meters: where the allocated bytes are read from.

- :class:`CudaMeter` reads PyTorch's CUDA caching allocator (``memory_allocated``, ``max_memory_allocated``,
  ``max_memory_reserved``) and the device (``mem_get_info``: total - free, which includes the CUDA context
  and any other process on the GPU; measure assumes it runs alone).
- :class:`CpuMeter` has no allocator to read, so it counts tensors: a ``TorchDispatchMode`` sees the output
  of every ATen op, and each new storage is counted once (by its data pointer) until its Python storage
  object dies (``weakref``). That gives exact live tensor bytes and their peak, with no caching allocator,
  no fragmentation and no CUDA context; memory a kernel takes without returning a tensor (scratch space)
  is invisible to it.

Both offer ``current() / peak() / reset_peak() / peak_reserved() / device_used() / capacity() /
synchronize()`` so the phase recorder does not care which one it reads.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

__all__ = ["CudaMeter", "CpuMeter", "StorageTracker", "Nvml"]


class CudaMeter:
    kind = "cuda-allocator"

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        dev = torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        #: Set when a card is rehearsed (:func:`memfit.measurer.engine.rehearse_card`): this process's CUDA
        #: context, measured at start, and the allocator's limit. The GPU may then be shared with other
        #: capped runs, so the device's used memory (``mem_get_info``) says nothing about this process:
        #: ``device_used`` becomes context + the allocator's peak reserve, and ``capacity`` the limit.
        self.context_bytes: int | None = None
        self.limit_bytes: int | None = None

    def start(self) -> None:
        cuda = self.torch.cuda
        cuda.set_device(self.device)
        cuda.synchronize(self.device)
        cuda.empty_cache()
        cuda.reset_peak_memory_stats(self.device)
        cuda.reset_accumulated_memory_stats(self.device)

    def stop(self) -> None:
        pass

    def current(self) -> int:
        return int(self.torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated(self.device))

    def reserved(self) -> int:
        return int(self.torch.cuda.memory_reserved(self.device))

    def peak_reserved(self) -> int:
        return int(self.torch.cuda.max_memory_reserved(self.device))

    def reset_peak(self) -> None:
        # Resets the peaks of allocated *and* reserved bytes; the recorder keeps the maxima itself.
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def device_used(self) -> int:
        if self.context_bytes is not None:
            return int(self.context_bytes + self.peak_reserved())
        free, total = self.torch.cuda.mem_get_info(self.device)
        return int(total - free)

    def capacity(self) -> int:
        if self.limit_bytes is not None:
            return int(self.limit_bytes)
        return int(self.torch.cuda.mem_get_info(self.device)[1])

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def adopt(self, tensors: Any) -> None:
        """Tensors made before the meter started are already in the allocator's count: nothing to do."""

    def allocator_stats(self) -> dict[str, int]:
        stats = self.torch.cuda.memory_stats(self.device)
        keep = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free",
                "num_sync_all_streams", "allocation.all.allocated", "segment.all.peak",
                "inactive_split_bytes.all.peak", "requested_bytes.all.peak")
        return {k: int(stats[k]) for k in keep if k in stats}

    def free_all(self) -> None:
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()


class StorageTracker:
    """Live bytes of distinct tensor storages, with their running peak."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        # data_ptr -> [weakref to the storage, nbytes]
        self._live: dict[int, list[Any]] = {}

    def see(self, t: Any) -> None:
        try:
            st = t.untyped_storage()
            n = st.nbytes()
            key = st.data_ptr()
        except (RuntimeError, NotImplementedError, AttributeError):
            return  # no storage (sparse, nested, meta): nothing to count
        if n == 0 or key == 0:
            return
        entry = self._live.get(key)
        if entry is not None:
            if entry[0]() is st:
                if entry[1] != n:  # the storage was resized in place
                    self.current += n - entry[1]
                    entry[1] = n
                    self.peak = max(self.peak, self.current)
                return
            self._drop(key, entry[0])  # a dead storage whose callback has not run yet
        ref = weakref.ref(st, lambda r, key=key: self._drop(key, r))
        self._live[key] = [ref, n]
        self.current += n
        if self.current > self.peak:
            self.peak = self.current

    def _drop(self, key: int, ref: Any) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            self.current -= entry[1]


def _tracking_mode(tracker: StorageTracker):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    tracker.see(t)
            return out

    return _Track()


class CpuMeter:
    kind = "cpu-tensors"

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        self.tracker = StorageTracker()
        self._mode = None
        self._window_peak = 0

    def start(self) -> None:
        self._mode = _tracking_mode(self.tracker)
        self._mode.__enter__()

    def stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def current(self) -> int:
        return self.tracker.current

    def peak(self) -> int:
        return self.tracker.peak

    def reserved(self) -> int:
        return self.tracker.current

    def peak_reserved(self) -> int:
        return self.tracker.peak  # no caching allocator: nothing is held beyond the live tensors

    def reset_peak(self) -> None:
        self.tracker.peak = self.tracker.current

    def device_used(self) -> None:
        return None

    def capacity(self) -> None:
        return None

    def synchronize(self) -> None:
        pass

    def adopt(self, tensors: Any) -> None:
        """Count tensors made before tracking began (a user's model built outside measure)."""
        for t in tensors:
            self.tracker.see(t)

    def allocator_stats(self) -> dict[str, int]:
        return {}

    def free_all(self) -> None:
        pass


class Nvml:
    """NVML's view of this process on the measured GPU, where pynvml (nvidia-ml-py) works; else silent."""

    def __init__(self, device: Any) -> None:
        self.handle = None
        self.pynvml = None
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            self.pynvml = pynvml
            props = torch.cuda.get_device_properties(device)
            uuid = str(getattr(props, "uuid", "") or "")
            if uuid:
                for candidate in (uuid if uuid.startswith("GPU-") else "GPU-" + uuid, uuid):
                    try:
                        self.handle = pynvml.nvmlDeviceGetHandleByUUID(candidate)
                        break
                    except Exception:  # noqa: BLE001 - try the next spelling
                        continue
            if self.handle is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
        except Exception:  # noqa: BLE001 - NVML is optional
            self.handle = None

    def process_used(self) -> int | None:
        """Bytes NVML reports for this process on the device (None where the pid is not visible)."""
        if self.handle is None:
            return None
        try:
            procs = self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:  # noqa: BLE001
            return None
        pid = os.getpid()
        for p in procs:
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def device_used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:  # noqa: BLE001
            return None

    def driver_version(self) -> str | None:
        if self.pynvml is None:
            return None
        try:
            v = self.pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # noqa: BLE001
            return None
