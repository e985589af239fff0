"""The fast account (running sums over the side lists a PyStream keeps as it is built, and the compiled
Stream's own walk) gives the event-by-event account's results, field by field and in the same key order, on
random streams built through the Stream API:
phase marks (repeated names, an empty name, none at all), one reset, several or none, anywhere (also before the
first allocation and just before a run of frees), streams without allocations."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest

from memfit.estimator import events
from memfit.estimator.events import PyStream, Stream

KINDS = [PyStream] + ([Stream] if Stream is not PyStream else [])


def _random_stream(seed: int, kind=PyStream):
    rng = random.Random(seed)
    s = kind()
    live: list[int] = []
    names = ["load", "forward", "backward", "", "forward", "optimizer_step", "decode"]
    comps = ["weights", "activations", "temporaries", "gradients", "kv_cache"]
    n = rng.choice((0, 1, 5, 40, 300))
    p_reset = rng.choice((0.0, 0.01, 0.05))
    p_phase = rng.choice((0.0, 0.03, 0.1))
    for _ in range(n):
        x = rng.random()
        if x < p_reset:
            s.reset_peaks()
        elif x < p_reset + p_phase:
            s.phase(rng.choice(names))
        elif live and x < 0.5:
            s.free(live.pop(rng.randrange(len(live))))
        else:
            # sizes repeat (ties between equal maxima), zero-byte tensors are skipped by the stream
            h = s.alloc(rng.choice((0, 0.4, 1, 512, 1000, 1000, 4096.5, 1 << 20, 3 << 20)), rng.choice(comps))
            if h >= 0:
                live.append(h)
    if rng.random() < 0.3:  # a tail of frees only, after a reset
        s.reset_peaks()
        s.free_all(live)
    return s


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__module__)
@pytest.mark.parametrize("seed", range(300))
def test_account_fast_is_account_full_on_random_streams(seed, kind):
    s = _random_stream(seed, kind)
    full, fast = events._account_full(s), events._account_fast(s)
    assert asdict(fast) == asdict(full)
    assert list(fast.components) == list(full.components)
    assert list(fast.phases) == list(full.phases)
    if kind is not PyStream:  # the compiled stream holds the stream the Python one builds
        p = _random_stream(seed)
        assert (s.ops, s.handles, s.phase_name) == (p.ops, p.handles, p.phase_name)


def test_the_random_streams_reach_the_cases():
    """The sample has streams with and without a reset, peaks at a reset and after one, empty streams."""
    kinds = set()
    for seed in range(300):
        s = _random_stream(seed)
        r = events._account_full(s)
        kinds.add(("reset" if s._resets else "no reset", "empty" if not s._n else "allocs"))
        if s._resets and s._n:
            at_reset = r.peak_allocated_bytes == sum(s._delta[:s._resets[-1] + 1])
            kinds.add("peak at the reset" if at_reset else "peak after the reset")
    assert {("reset", "allocs"), ("no reset", "allocs"), ("no reset", "empty"), "peak at the reset",
            "peak after the reset"} <= kinds


def test_ops_added_directly_fall_back_to_the_full_walk():
    """A stream whose ``ops`` were extended by hand (the side lists do not follow) is accounted event by event."""
    s = PyStream()
    s.phase("forward")
    a = s.alloc(100, "w")
    s.ops.append((0, 1, 50, "x"))  # not through alloc()
    s.free(a)
    assert asdict(events._account_fast(s)) == asdict(events._account_full(s))
    assert events._account_fast(s).peak_allocated_bytes == 150
