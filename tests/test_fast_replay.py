"""The fast replay path gives exactly the full replay's answers (a small sample of
validation/check_fast_replay.py, which runs the whole grid).

Full replay: ``memfit.estimator.events._FULL_REPLAY`` on (``MEMFIT_FULL_REPLAY=1``): one malloc/free call per
event, the event-by-event account, no replay skipped or reused."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import pytest

from memfit import Job
from memfit.allocator import AllocatorConfig, CachingAllocatorModel
from memfit.boundary import largest_passing
from memfit.estimator import _stream, estimate, events, fits_on, max_batch_size
from memfit.estimator.events import Stream
from memfit.models import load_model

GiB = 1 << 30


@pytest.fixture
def full_replay(monkeypatch):
    """Call the returned function with True/False to switch the full replay on/off for this test."""
    def switch(on: bool) -> None:
        monkeypatch.setattr(events, "_FULL_REPLAY", on)
    return switch


def _random_ops(seed: int, n: int = 600) -> list[tuple]:
    """A random alloc/free sequence with small, 1-10 MiB and large requests (and repeats of each size)."""
    rng = random.Random(seed)
    sizes = [rng.choice((rng.randrange(1, 1 << 20), rng.randrange(1 << 20, 10 << 20),
                         rng.randrange(10 << 20, 300 << 20))) for _ in range(40)]
    live: list[int] = []
    ops: list[tuple] = []
    h = 0
    for _ in range(n):
        if live and rng.random() < 0.45:
            ops.append((1, live.pop(rng.randrange(len(live)))))
        else:
            ops.append((0, h, rng.choice(sizes), "x"))
            live.append(h)
            h += 1
        if rng.random() < 0.05:
            ops.append((2, "phase"))
    return ops


def _one_by_one(model: CachingAllocatorModel, ops: list[tuple]) -> int:
    blocks = {}
    for i, op in enumerate(ops):
        if op[0] == 0:
            try:
                blocks[op[1]] = model.malloc(op[2])
            except MemoryError:
                return i
        elif op[0] == 1:
            model.free(blocks.pop(op[1]))
    return -1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("setting", ["", "expandable_segments:True", "max_split_size_mb:64"])
def test_run_is_malloc_and_free_one_by_one(seed, setting):
    """``CachingAllocatorModel.run`` leaves the model in the same state as the calls one by one: every
    memory_stats() counter, every segment and block, the request that ran out of memory."""
    ops = _random_ops(seed)
    stopped = {}
    for cap in (None, 600 << 20, 1500 << 20, 3000 << 20):
        cfg = AllocatorConfig.from_env_string(setting)
        a = CachingAllocatorModel(cap, config=cfg, on_oom="raise")
        b = CachingAllocatorModel(cap, config=cfg, on_oom="raise")
        stopped[cap] = a.run(ops)
        assert stopped[cap] == _one_by_one(b, ops)
        assert a.memory_stats() == b.memory_stats()
        assert a.segments() == b.segments()
    assert stopped[None] == -1 and stopped[600 << 20] >= 0  # both ends: a run that completes, one that fails


@pytest.mark.parametrize("seed", range(4))
def test_run_with_a_physical_limit_is_malloc_and_free_one_by_one(seed):
    """Under ``physical_bytes`` (alone, or with a capacity above or below it) ``run`` leaves the model where the
    calls one by one do: the loop's one limit check stands for both of ``alloc_block``'s."""
    ops = _random_ops(seed)
    for cap, physical in ((None, 900 << 20), (2000 << 20, 900 << 20), (700 << 20, 900 << 20)):
        a = CachingAllocatorModel(cap, on_oom="raise", physical_bytes=physical)
        b = CachingAllocatorModel(cap, on_oom="raise", physical_bytes=physical)
        assert a.run(ops) == _one_by_one(b, ops)
        assert a.memory_stats() == b.memory_stats()
        assert a.segments() == b.segments()


def _streams():
    spec = load_model("llama-3.2-1b")
    yield _stream(spec, Job(model="llama-3.2-1b", batch_size=2, seq_len=512))[0]
    yield _stream(spec, Job(model="llama-3.2-1b", method="lora", gradient_checkpointing=True, seq_len=512))[0]
    g = load_model("gemma-3-1b")
    yield _stream(g, Job(model="gemma-3-1b", task="infer", prompt_len=1024, new_tokens=16, batch_size=3))[0]
    # hand-made: no reset; a reset in the middle of a phase followed by frees only; a repeated phase name
    s = Stream()
    a = s.alloc(100, "w")
    s.phase("p")
    b = s.alloc(50, "x")
    s.free(b)
    yield s
    s = Stream()
    s.phase("p")
    a, b = s.alloc(100, "w"), s.alloc(70, "x")
    s.reset_peaks()
    s.free(b)
    s.phase("q")
    s.alloc(10, "y")
    s.phase("p")
    s.alloc(5, "x")
    s.free(a)
    yield s
    yield Stream()


def test_account_fast_is_account_full():
    for s in _streams():
        full, fast = events._account_full(s), events._account_fast(s)
        assert asdict(full) == asdict(fast)
        assert list(full.components) == list(fast.components) and list(full.phases) == list(fast.phases)


@pytest.mark.parametrize("expandable", [False, True])
def test_capped_replay_reusing_the_uncapped_one(full_replay, expandable):
    """At caps around the stream's own peak reserve (under, at, over) the capped replay given the uncapped
    one is the full capped replay, field by field."""
    for s in list(_streams())[:3]:
        full_replay(True)
        free = events.replay(s, expandable_segments=expandable)
        peak = free.peak_reserved_bytes
        for cap in (peak - (32 << 20), peak - 1, peak, peak + 1, 2 * peak):
            full_replay(True)
            ref = events.replay(s, capacity_bytes=cap, expandable_segments=expandable)
            full_replay(False)
            got = events.replay(s, capacity_bytes=cap, expandable_segments=expandable, uncapped=free)
            assert asdict(got) == asdict(ref)


def _doubling_search(trial, limit):
    """The loop estimator.max_batch_size and the planner had before the shared search: double from 1 while the
    trial passes, then bisect. Returns (answer, the batches tried in order)."""
    seen = []

    def t(b):
        seen.append(b)
        return trial(b)
    if not t(1):
        return 0, seen
    lo, hi = 1, 2
    while hi <= limit and t(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if t(mid):
            lo = mid
        else:
            hi = mid
    return lo, seen


def _old_max_batch_size(job, card, spec, limit=1 << 16):
    return _doubling_search(lambda b: fits_on(job.replace(batch_size=b), card, spec), limit)[0]


@pytest.mark.parametrize("kw,card", [
    (dict(model="llama-3.2-1b", precision="bf16-true", seq_len=1024), 16 * GiB),
    (dict(model="gemma-3-1b", task="infer", precision="bf16-true", prompt_len=1024, new_tokens=8), 16 * GiB),
    (dict(model="qwen2.5-0.5b", method="qlora", seq_len=512, expandable_segments=True), 24 * GiB),
])
def test_estimate_fits_and_max_batch_match_the_full_replay(full_replay, kw, card):
    spec = load_model(kw["model"])
    job = Job(**kw)
    answers = {}
    for on in (True, False):
        full_replay(on)
        answers[on] = json.dumps({
            "estimate": estimate(job, spec).to_dict(),
            "cards": [estimate(job, spec, gpu_memory_bytes=c).to_dict() for c in (4 * GiB, 8 * GiB, card)],
            "fits_on": [fits_on(job.replace(batch_size=b), card, spec) for b in (1, 2, 8, 64)],
            "max_batch_size": _old_max_batch_size(job, card, spec) if on else max_batch_size(job, card, spec=spec),
        })
    assert answers[True] == answers[False]


def test_shared_search_tries_what_the_doubling_loops_tried():
    """From 1 with a power-of-two limit the shared search tries the batches the estimator's and the planner's
    doubling-then-bisecting loops tried, in the same order, so even a trial that is not monotone (fragmentation
    can make one) gets the same answer."""
    old = _doubling_search

    rng = random.Random(7)
    for _ in range(300):
        limit = 1 << rng.randrange(0, 12)
        holes = {rng.randrange(1, 2 * limit) for _ in range(rng.randrange(0, 4))}
        edge = rng.randrange(0, limit + 2)
        trial = lambda b: b <= edge and b not in holes  # noqa: E731
        best, tried = largest_passing(trial, limit=limit)
        ref_best, ref_seen = old(trial, limit)
        assert best == ref_best and [b for b, _ in tried] == ref_seen


@pytest.mark.parametrize("expandable", [False, True])
def test_a_limit_never_reached_is_the_run_under_every_larger_one(full_replay, expandable):
    """What :class:`memfit.estimator.Memo` skips replays by: a capped replay that never reached its limit
    (``limit_reached`` false) is, field by field, the full replay under every larger limit; with the default
    setting that is so exactly from the stream's unlimited peak reserve up."""
    full_replay(True)
    for s in list(_streams())[:3]:
        peak = events.replay(s, expandable_segments=expandable).peak_reserved_bytes  # its own unlimited reserve
        caps = sorted({peak - (64 << 20), peak - (2 << 20), peak - 1, peak, peak + 1, peak + (20 << 20), 2 * peak})
        runs = {c: events.replay(s, capacity_bytes=c, expandable_segments=expandable) for c in caps}
        if not expandable:
            assert [not runs[c].limit_reached for c in caps] == [c >= peak for c in caps]
        assert any(r.limit_reached for r in runs.values()) and not runs[2 * peak].limit_reached
        for c in caps:
            if runs[c].completed and not runs[c].limit_reached:
                for larger in (x for x in caps if x > c):
                    assert asdict(runs[larger]) == asdict(runs[c]), (c, larger)


def test_memo_gives_the_answers_without_it():
    """estimate() and fits_on() with one Memo shared by many questions (jobs differing only in the allocator
    setting share a stream; limits asked rising and falling around each job's own boundary) answer as they do
    without it."""
    from memfit.estimator import Memo

    memos: dict[str, Memo] = {}  # one per model
    cases = [("llama-3.2-1b", dict(method="lora", seq_len=1024, batch_size=4)),
             ("llama-3.2-1b", dict(method="lora", seq_len=1024, batch_size=4, expandable_segments=True)),
             ("qwen2.5-0.5b", dict(seq_len=512, batch_size=8, optimizer="paged-adamw-8bit")),
             ("gemma-3-1b", dict(task="infer", prompt_len=512, new_tokens=8, batch_size=4)),
             ("qwen2.5-0.5b", dict(gpus=2, strategy="ddp", seq_len=512, batch_size=4)),
             ("qwen2.5-0.5b", dict(gpus=4, strategy="fsdp2", seq_len=512, batch_size=4, expandable_segments=True))]
    for model, kw in cases:
        spec = load_model(model)
        memo = memos.setdefault(model, Memo())
        job = Job(model=model, **kw)
        total = estimate(job, spec).device_total_bytes
        cards = [total - (256 << 20), total - (1 << 20), total, total + (1 << 20), total + GiB]
        for card in cards + cards[::-1]:
            got = (estimate(job, spec, gpu_memory_bytes=card, memo=memo).to_dict(),
                   fits_on(job, card, spec, memo=memo))
            ref = (estimate(job, spec, gpu_memory_bytes=card).to_dict(), fits_on(job, card, spec))
            assert got == ref, (model, kw, card)
        assert estimate(job, spec, memo=memo).to_dict() == estimate(job, spec).to_dict()
    with pytest.raises(ValueError):  # jobs are keyed by their fields: a Memo is for one model
        fits_on(Job(model="qwen2.5-0.5b", seq_len=512), 8 * GiB, load_model("qwen2.5-0.5b"), memo=memos["llama-3.2-1b"])
