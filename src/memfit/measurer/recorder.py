"""The phase recorder both measure engines hang on :mod:`memfit.reference`'s phase hooks.

:func:`memfit.measurer.measure` (one device) and :mod:`memfit.measurer.distributed` (one rank of a
torchrun job) read the allocator the same way: once the measured window starts (after the warm-up), each
phase boundary closes the phase that ends - its peak, the bytes allocated at its end, the reserve's peak,
the device's used memory, each the largest over the window's steps - and resets the peak for the next one.
What peaks outside the named phases (``load``, ``end``) goes to ``between``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PhaseRecorder"]


class PhaseRecorder:
    """Phase hooks (``on_phase``) over a meter with ``current() / peak() / peak_reserved() / reset_peak() /
    device_used() / synchronize()`` (:mod:`memfit.measurer.meters`).

    ``sync``: also wait for the device at every boundary before reading it (the multi-GPU run, whose
    collectives run on streams of their own); the window's start is always synchronized.
    """

    def __init__(self, meter: Any, *, sync: bool = False) -> None:
        self.meter = meter
        self.sync = sync
        self.phase = "load"
        self.recording = False
        self.phases: dict[str, int] = {}
        self.after: dict[str, int] = {}
        self.between = 0
        self.peak_reserved = 0
        self.device_used = 0
        self.window_start = 0

    def start_window(self) -> None:
        self.meter.synchronize()
        self.recording = True
        self.meter.reset_peak()
        # What stays allocated between steps: weights, states, inputs, and what the warm-up left for good
        # (cuBLAS workspaces, the GradScaler's scale, step counters).
        self.window_start = self.meter.current()

    def on_phase(self, name: str) -> None:
        if self.recording:
            if self.sync:
                self.meter.synchronize()
            self._close(self.phase, name)
            self.meter.reset_peak()
        self.phase = name

    def finish(self) -> None:
        if self.recording:
            if self.sync:
                self.meter.synchronize()
            self._close(self.phase, "done")
        self.recording = False

    def _close(self, phase: str, next_name: str) -> None:
        """Fold the phase that ends into the maxima (``next_name``: the phase that starts, ``done`` at the end)."""
        m = self.meter
        peak = m.peak()
        if phase in ("end", "load"):
            self.between = max(self.between, peak)
        else:
            self.phases[phase] = max(self.phases.get(phase, 0), peak)
            key = f"after_{phase}"
            self.after[key] = max(self.after.get(key, 0), m.current())
        self.peak_reserved = max(self.peak_reserved, m.peak_reserved())
        used = m.device_used()
        if used is not None:
            self.device_used = max(self.device_used, used)
