"""Memo.verdict replays both orders of segment addresses at once where another core is free (the compiled
replay's replay_pair, memfit.estimator.events.replay_both): the answers are those of the replays one after
another."""

from __future__ import annotations

import pytest

import memfit.estimator as estimator
from memfit import Job
from memfit.allocator import model as allocator_model, replay_both_orders, replay_ops
from memfit.estimator import Memo, _stream, estimate, fits_on
from memfit.models import load_model

GiB = 2**30
needs_compiled = pytest.mark.skipif(allocator_model.COMPILED is None, reason="the compiled replay is not built")


def _answers(jobs, spec, cards):
    out = []
    for job in jobs:
        memo = Memo()
        for card in cards:
            b = estimate(job, spec, gpu_memory_bytes=card, memo=memo)
            out.append((job.batch_size, card, fits_on(job, card, spec, memo=memo), b.fits, b.peak_reserved_bytes,
                        b.device_total_bytes, b.headroom_bytes, tuple(b.notes), b.extras.get("decided_by")))
    return out


@pytest.mark.parametrize("model,kw", [("qwen2.5-0.5b", {}), ("llama-3.2-1b", {"method": "lora",
                                                                              "gradient_checkpointing": True})])
def test_verdicts_of_both_orders_at_once_are_the_sequential_ones(model, kw, monkeypatch):
    spec = load_model(model)
    jobs = [Job(model=model, batch_size=b, seq_len=1024, **kw) for b in (1, 2, 4, 8, 16)]
    cards = [8 * GiB, 12 * GiB, 16 * GiB, 24 * GiB]  # fits, fails through fragmentation, fails outright
    monkeypatch.setattr(estimator, "_CORES", [False])
    sequential = _answers(jobs, spec, cards)
    monkeypatch.setattr(estimator, "_CORES", [True])
    from memfit.estimator import events

    calls = []
    real = events.replay_both
    monkeypatch.setattr(events, "replay_both", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _answers(jobs, spec, cards) == sequential
    assert any(not a[2] for a in sequential) and any(a[2] for a in sequential)
    if allocator_model.COMPILED is not None:
        assert calls, "no verdict replayed both orders at once"


@needs_compiled
def test_the_pair_is_each_order_alone():
    spec = load_model("llama-3.2-1b")
    stream = _stream(spec, Job(model="llama-3.2-1b", batch_size=4, seq_len=1024))[0]
    for cap in (1, 6 * GiB, 9 * GiB, 12 * GiB, 40 * GiB, None):
        down, up = replay_both_orders(stream, cap)
        assert down == replay_ops(stream, cap)
        if up is None:  # stopped: only where the first order ran out of memory
            assert down.index >= 0
        else:
            assert up == replay_ops(stream, cap, large_addresses="up")
    assert replay_both_orders(stream, 1)[0].index >= 0
    assert replay_both_orders(list(stream.ops), 1) is None  # operation tuples: the orders one after the other


@needs_compiled
def test_the_kept_worker_serves_threads_at_once_and_a_forked_child():
    """The second order runs on one worker thread kept between calls: callers on several Python threads at once
    (one has the worker, the others replay both orders themselves) and a forked child (which has no worker
    until it makes one) get the same figures."""
    import os
    import sys
    import threading

    spec = load_model("llama-3.2-1b")
    stream = _stream(spec, Job(model="llama-3.2-1b", batch_size=2, seq_len=1024))[0]
    cap = 40 * GiB
    want = (replay_ops(stream, cap), replay_ops(stream, cap, large_addresses="up"))
    assert replay_both_orders(stream, cap) == want
    got, errors = [], []

    def worker():
        try:
            for _ in range(20):
                got.append(replay_both_orders(stream, cap))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 80 and all(g == want for g in got)
    if sys.platform == "win32" or not hasattr(os, "fork"):
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's worker is not there
        ok = all(replay_both_orders(stream, cap) == want for _ in range(3))
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    answer = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == b"1"
