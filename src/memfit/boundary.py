"""The search for the largest passing size: gallop, then bisect. One helper for every boundary memfit looks for.

The measure engine's ``--find-max-batch`` (real trials on a capped GPU, :mod:`memfit.measurer.fit`), the
estimator's :func:`memfit.estimator.max_batch_size` (capped replays of the event stream) and the planner's
:func:`memfit.plan.search.max_batch` / :func:`~memfit.plan.search.max_seq_len` all ask the same question of a
trial that passes up to some size and fails above it. Pure Python, no torch, no memfit imports.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["largest_passing", "first_step"]


def first_step(start: int) -> int:
    """The search's first stride from a hint ``start``: 1/32 of it (at least 1), so a hint a few per cent
    off costs a few trials at batch 300 as at batch 3."""
    return max(1, start // 32)


def largest_passing(trial: Callable[[int], Any], *, start: int = 1,
                    limit: int = 1 << 16) -> tuple[int, list[tuple[int, bool]]]:
    """The largest ``b`` in ``1..limit`` for which ``trial(b)`` is truthy, proven by ``trial(b + 1)`` failing
    (unless ``b == limit``); 0 when ``trial(1)`` fails. ``start`` and ``limit`` are whole numbers >= 1 (the
    callers check them), ``start <= limit``.

    The search gallops from ``start``: up by strides of d, 2d, 4d, ... while trials pass, or down by the same
    strides while they fail, until it brackets the boundary between a passing and a failing size; then it
    bisects that bracket. ``d`` is :func:`first_step` of ``start`` (1 below 64). From 1 it tries 1, 2, 4, 8,
    16, ... (doubling); from a hint ``s < 64`` that is the boundary it needs two trials (``s`` passes,
    ``s + 1`` fails). A hint changes only how many trials are run, never the answer, as long as ``trial`` is
    monotone (a size that passes implies every smaller one passes). Each size is tried at most once. Returns
    ``(best, [(size, passed), ...])`` in the order tried."""
    tried: list[tuple[int, bool]] = []
    seen: dict[int, bool] = {}

    def ok(b: int) -> bool:
        if b not in seen:
            seen[b] = bool(trial(b))
            tried.append((b, seen[b]))
        return seen[b]

    step = first_step(start)
    if ok(start):
        lo, hi = start, None
        while lo < limit:
            b = min(lo + step, limit)
            if ok(b):
                lo, step = b, step * 2
            else:
                hi = b
                break
        if hi is None:  # every size up to the limit passed
            return lo, tried
    else:
        lo, hi = 0, start
        while hi > 1:
            b = max(hi - step, 1)
            if ok(b):
                lo = b
                break
            hi, step = b, step * 2
        if lo == 0:  # size 1 fails
            return 0, tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried
