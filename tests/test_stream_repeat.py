"""The shortcuts of stream building give the stream the plain code builds, op for op:

- identical layers copied from the layer before (``estimator._REPEAT_LAYERS``, :meth:`Stream.repeat`);
- the compiled helpers of ``_events.c`` (``events._COMPILED``: the copy, a decode step's cache growth
  :meth:`Stream.regrow`, and the walk of :func:`events.account`) against their Python versions."""

from __future__ import annotations

import random

import pytest

import memfit.estimator as estimator
from memfit import Job
from memfit.checks import check_job_for_model
from memfit.errors import MemfitError
from memfit.estimator import _stream, events
from memfit.estimator.events import Stream, _account_full, account
from memfit.models import list_models, load_model

MODELS = [m["name"] if isinstance(m, dict) else m for m in list_models()]
JOBS = [dict(), dict(method="lora", gradient_checkpointing=True), dict(method="qlora", gradient_checkpointing=True),
        dict(precision="bf16-true", attention="eager"), dict(task="infer", new_tokens=6, batch_size=3),
        dict(task="infer", new_tokens=0, precision="bf16-true", attention="eager")]


def _built(spec, job):
    stream, comps, phase, phases, notes = _stream(spec, job)
    return (stream.ops, stream._size, stream._comp, stream._delta, stream._marks, stream._resets, stream._n,
            comps, phase, phases, notes)


def _jobs(name):
    spec = load_model(name)
    for kw in JOBS:
        job = Job(model=name, **{"batch_size": 2, "seq_len": 256, **kw})
        try:
            check_job_for_model(job, spec)
        except MemfitError:
            continue
        yield spec, job


@pytest.mark.parametrize("name", MODELS)
def test_repeated_layers_build_the_same_stream(name, monkeypatch):
    for spec, job in _jobs(name):
        monkeypatch.setattr(estimator, "_REPEAT_LAYERS", False)
        plain = _built(spec, job)
        monkeypatch.setattr(estimator, "_REPEAT_LAYERS", True)
        assert _built(spec, job) == plain, job


@pytest.mark.skipif(events._COMPILED is None, reason="the compiled stream helpers are not built")
@pytest.mark.parametrize("name", MODELS[::3])
def test_compiled_helpers_build_the_same_stream(name, monkeypatch):
    compiled = events._COMPILED
    for spec, job in _jobs(name):
        monkeypatch.setattr(events, "_COMPILED", None)
        python = _built(spec, job)
        monkeypatch.setattr(events, "_COMPILED", compiled)
        assert _built(spec, job) == python, job


def _random_stream(rng: random.Random) -> Stream:
    s = Stream()
    live: list[int] = []
    for _ in range(rng.randrange(0, 400)):
        r = rng.random()
        if r < 0.05:
            s.phase(rng.choice(["", "forward", "backward", "step"]))
        elif r < 0.07:
            s.reset_peaks()
        elif live and r < 0.45:
            s.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(s.alloc(rng.choice((0, 1, 512, 3000.4, rng.randrange(1, 1 << 34))),
                                rng.choice(["weights", "activations", "temporaries"])))
    return s


@pytest.mark.skipif(events._COMPILED is None, reason="the compiled stream helpers are not built")
@pytest.mark.parametrize("seed", range(60))
def test_compiled_account_is_the_walk(seed, monkeypatch):
    s = _random_stream(random.Random(seed))
    assert account(s) == _account_full(s)
    monkeypatch.setattr(events, "_COMPILED", None)
    assert account(s) == _account_full(s)


def _stretch():
    s = Stream()
    before, twin, other = s.alloc(100, "x"), s.alloc(100, "x"), s.alloc(50, "x")
    at = s.mark()
    a = s.alloc(10, "y")
    s.free(before)
    s.free(a)
    return s, at, before, twin, other


def test_repeat_copies_a_stretch():
    s, at, before, twin, _ = _stretch()
    assert s.repeat(at, {before: twin}) == 1
    assert s.ops[-3:] == [(0, 4, 10, "y"), (1, twin), (1, 4)]
    assert s._size[-1] == 10 and s._comp[-1] == "y" and s._delta[-3:] == [10, -100, -10] and s._n == 5


def test_repeat_refuses_what_it_cannot_copy():
    s, at, before, twin, other = _stretch()
    n = len(s.ops)
    assert s.repeat(at, {}) is None  # frees a tensor from before the stretch that nothing maps
    assert s.repeat(at, {before: other}) is None  # mapped to a tensor of other bytes
    s.phase("step")
    assert s.repeat(at, {before: twin}) is None  # a phase mark in the stretch
    assert len(s.ops) == n + 1 and s._n == 4


def test_regrow_is_alloc_then_free(monkeypatch):
    for compiled in (events._COMPILED, None):
        monkeypatch.setattr(events, "_COMPILED", compiled)
        a, b = Stream(), Stream()
        held_a = [[a.alloc(10, "kv"), a.alloc(20.6, "kv")], [a.alloc(0, "kv")]]
        held_b = [[b.alloc(10, "kv"), b.alloc(20.6, "kv")], [b.alloc(0, "kv")]]
        sizes = [[11, 21.2], [0.2, 7]]
        a.regrow(held_a, sizes, "kv")
        for i, want in enumerate(sizes):
            new = [b.alloc(x, "kv") for x in want]
            b.free_all(held_b[i])
            held_b[i] = new
        assert (a.ops, a._size, a._comp, a._delta, a._n, held_a) == (b.ops, b._size, b._comp, b._delta, b._n, held_b)
