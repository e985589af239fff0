"""The shortcuts of stream building give the stream the plain code builds, op for op:

- identical layers copied from the layer before (``estimator._REPEAT_LAYERS``, :meth:`Stream.repeat`);
- the compiled stream of ``_events.c`` (``events.Stream``: operations kept as flat integers, the copy, a decode
  step's cache growth :meth:`Stream.regrow`, its walk for :func:`events.account`, its replay through the
  allocator's buffer path) against :class:`events.PyStream`."""

from __future__ import annotations

import random

import pytest

import memfit.estimator as estimator
from memfit import Job
from memfit.checks import check_job_for_model
from memfit.errors import MemfitError
from memfit.estimator import _stream, events
from memfit.estimator.events import PyStream, Stream, _account_full, account, replay
from memfit.models import list_models, load_model

MODELS = [m["name"] if isinstance(m, dict) else m for m in list_models()]
JOBS = [dict(), dict(method="lora", gradient_checkpointing=True), dict(method="qlora", gradient_checkpointing=True),
        dict(precision="bf16-true", attention="eager"), dict(task="infer", new_tokens=6, batch_size=3),
        dict(task="infer", new_tokens=0, precision="bf16-true", attention="eager")]


def _built(spec, job):
    stream, comps, phase, phases, notes = _stream(spec, job)
    return (stream.ops, stream.handles, stream.phase_name, len(stream), comps, phase, phases, notes)


compiled_only = pytest.mark.skipif(Stream is PyStream, reason="the compiled stream is not built")


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


@compiled_only
@pytest.mark.parametrize("name", MODELS[::3])
def test_compiled_stream_builds_the_same_stream(name, monkeypatch):
    """Every third registry model: the same operations, handles and account from both streams, and the same
    replays (uncapped, and capped where the run fails and where it does not) through the allocator's two
    input paths (the compiled stream's buffer, PyStream's tuples)."""
    for spec, job in _jobs(name):
        monkeypatch.setattr(events, "Stream", PyStream)
        python = _built(spec, job)
        ref = _stream(spec, job)[0]
        monkeypatch.setattr(events, "Stream", Stream)
        assert _built(spec, job) == python, job
        got = _stream(spec, job)[0]
        assert type(got) is Stream and type(ref) is PyStream
        free = replay(ref)
        assert replay(got) == free, job
        for cap in (free.peak_reserved_bytes // 2, free.peak_reserved_bytes * 9 // 10):
            for order in ("down", "up"):
                assert (replay(got, capacity_bytes=cap, large_addresses=order)
                        == replay(ref, capacity_bytes=cap, large_addresses=order)), (job, cap, order)


KINDS = [PyStream] + ([Stream] if Stream is not PyStream else [])
kinds = pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__module__)


def _random_stream(rng: random.Random, kind=PyStream):
    s = kind()
    live: list[int] = []
    for _ in range(rng.randrange(0, 400)):
        r = rng.random()
        if r < 0.05:
            s.phase(rng.choice(["", "forward", "backward", "step"]))
        elif r < 0.07:
            s.reset_peaks()
        elif live and r < 0.45:
            s.free(live.pop(rng.randrange(len(live))))
        elif live and r < 0.5:
            # a stretch copied with one tensor from before it mapped to itself (a size check that passes)
            at = s.mark()
            x = live[rng.randrange(len(live))]
            y = s.alloc(rng.randrange(1, 5000), "activations")
            s.free(y)
            s.repeat(at, {x: x})
        else:
            live.append(s.alloc(rng.choice((0, 1, 0.5, 1.5, 2.5, -3, True, 512, 3000.4, rng.randrange(1, 1 << 34),
                                            float(rng.randrange(1 << 53, 1 << 60)))),
                                rng.choice(["weights", "activations", "temporaries"])))
    return s


@compiled_only
@pytest.mark.parametrize("seed", range(60))
def test_compiled_stream_is_the_python_one(seed):
    """Random streams (sizes rounded half to even, zero and negative ones skipped, past 2**53, copied stretches):
    the same operations, account and replays from both."""
    p, c = _random_stream(random.Random(seed)), _random_stream(random.Random(seed), Stream)
    assert (c.ops, c.handles, c.phase_name, len(c)) == (p.ops, p.handles, p.phase_name, len(p))
    assert account(c) == account(p) == _account_full(p)
    assert [c.op(i) for i in range(len(c))] == p.ops
    assert [c.phase_at(i) for i in range(len(c))] == [p.phase_at(i) for i in range(len(p))]
    free = replay(p)
    assert replay(c) == free
    assert replay(c, capacity_bytes=free.peak_reserved_bytes // 3) == replay(p, capacity_bytes=free.peak_reserved_bytes // 3)


@compiled_only
def test_compiled_stream_refuses_what_it_cannot_hold():
    """Sizes of 2**62 bytes or more raise OverflowError (the estimator then builds a PyStream), NaN a ValueError
    as ``round`` does; a free of a handle never made is an IndexError."""
    s = Stream()
    for bad, err in ((1 << 62, OverflowError), (float(1 << 62), OverflowError), (float("inf"), OverflowError),
                     (float("nan"), ValueError)):
        with pytest.raises(err):
            s.alloc(bad, "x")
    with pytest.raises(IndexError):
        s.free(0)
    with pytest.raises(TypeError):
        s.alloc(1, 2)
    assert len(s) == 0 and s.handles == 0
    built = events.build(lambda st: st.alloc(1 << 70, "x"))
    assert type(built) is PyStream and built.ops == [(0, 0, 1 << 70, "x")]


def _stretch(kind):
    s = kind()
    before, twin, other = s.alloc(100, "x"), s.alloc(100, "x"), s.alloc(50, "x")
    at = s.mark()
    a = s.alloc(10, "y")
    s.free(before)
    s.free(a)
    return s, at, before, twin, other


@kinds
def test_repeat_copies_a_stretch(kind):
    s, at, before, twin, _ = _stretch(kind)
    assert s.repeat(at, {before: twin}) == 1
    assert s.ops[-3:] == [(0, 4, 10, "y"), (1, twin), (1, 4)]
    assert s.handles == 5
    assert account(s).peak_allocated_bytes == 260


@kinds
def test_repeat_refuses_what_it_cannot_copy(kind):
    s, at, before, twin, other = _stretch(kind)
    n = len(s.ops)
    assert s.repeat(at, {}) is None  # frees a tensor from before the stretch that nothing maps
    assert s.repeat(at, {before: other}) is None  # mapped to a tensor of other bytes
    s.phase("step")
    assert s.repeat(at, {before: twin}) is None  # a phase mark in the stretch
    assert len(s.ops) == n + 1 and s.handles == 4


@kinds
def test_repeat_map_is_repeat_with_its_lists_shifted(kind):
    s, at, before, twin, other = _stretch(kind)
    # keys -1 map nothing; the last of equal keys wins (as a dict built from the pairs)
    got = s.repeat_map(at, ([-1, before], [before]), ([other, other], [twin]), ([3, -1, before], [before]), before, 7)
    assert got == (1, [4, -1, 7], [7])
    assert s.ops[-3:] == [(0, 4, 10, "y"), (1, twin), (1, 4)]
    n = len(s.ops)
    assert s.repeat_map(at, ([before],), ([other],), ([3],), -2, -2) is None  # other bytes
    assert s.repeat_map(at, (), (), ([3],), -2, -2) is None  # nothing maps the freed tensor
    assert len(s.ops) == n and s.handles == 5
    with pytest.raises((ValueError, TypeError)):
        s.repeat_map(at, ([before, twin],), ([twin],), (), -2, -2)  # keys and values of different lengths


@kinds
def test_regrow_is_alloc_then_free(kind):
    a, b = kind(), kind()
    held_a = [[a.alloc(10, "kv"), a.alloc(20.6, "kv")], [a.alloc(0, "kv")]]
    held_b = [[b.alloc(10, "kv"), b.alloc(20.6, "kv")], [b.alloc(0, "kv")]]
    sizes = [[11, 21.2], [0.2, 7]]
    a.regrow(held_a, sizes, "kv")
    for i, want in enumerate(sizes):
        new = [b.alloc(x, "kv") for x in want]
        b.free_all(held_b[i])
        held_b[i] = new
    assert (a.ops, a.handles, held_a) == (b.ops, b.handles, held_b)
    assert account(a) == account(b)


@pytest.mark.parametrize("name", MODELS)
def test_later_training_steps_copied_build_the_same_stream(name, monkeypatch):
    # a training stream's second step as the first one's stretch again (estimator._REPEAT_STEPS, Stream.again),
    # in both stream kinds
    for kind in KINDS:
        monkeypatch.setattr(events, "Stream", kind)
        for spec, job in _jobs(name):
            if job.task != "train":
                continue
            monkeypatch.setattr(estimator, "_REPEAT_STEPS", False)
            plain = _built(spec, job)
            monkeypatch.setattr(estimator, "_REPEAT_STEPS", True)
            assert _built(spec, job) == plain, (kind, job)


INTERPOLATED = [("llama-3.2-1b", dict(precision="bf16-true", gradient_checkpointing=True)),
                ("qwen3-30b-a3b", dict(method="lora", precision="bf16-true")),
                ("gemma-3-1b", dict(method="qlora", gradient_checkpointing=True)),
                ("gpt2", dict(precision="bf16-mixed"))]


@compiled_only
@pytest.mark.parametrize("name, kw", INTERPOLATED, ids=lambda x: str(x)[:30])
def test_a_stream_made_from_two_micro_batches_is_the_built_one(name, kw):
    """Stream.interpolate: a training stream at micro-batch b from two others of its setting is the stream built
    at b, operation for operation (validation/check_interpolated_streams.py checks every registry model)."""
    spec = load_model(name)

    def built(b):
        return _stream(spec, Job(model=name, batch_size=b, seq_len=256, **kw))[0]

    a, c = built(3), built(1)
    for b in (2, 4, 7):
        made = a.interpolate(c, 3, 1, b)
        assert made is not None
        assert list(made.ops) == list(built(b).ops)
        assert made.handles == built(b).handles
    other = _stream(spec, Job(model=name, batch_size=2, seq_len=512, **{**kw, "gradient_checkpointing":
                                                                        not kw.get("gradient_checkpointing", False)}))[0]
    assert a.interpolate(other, 3, 2, 5) is None  # not the same operations: no stream
    with pytest.raises(ValueError):
        a.interpolate(c, 1, 1, 2)


def test_estimates_of_a_sweep_are_the_same_with_streams_made_from_two(monkeypatch):
    """The Memo makes a setting's third and later micro-batches from its first two builds (estimator._INTERPOLATE);
    every figure of the estimates, on a card and without, is the one the builds give."""
    spec = load_model("qwen2.5-0.5b")
    jobs = [Job(model="qwen2.5-0.5b", batch_size=b, seq_len=512, gradient_checkpointing=True) for b in (8, 3, 1, 5, 12, 2)]

    memos = []

    def sweep():
        memo = estimator.Memo()
        memos.append(memo)
        return [(estimator.estimate(j, spec, gpu_memory_bytes=16 << 30, memo=memo).to_dict(),
                 estimator.estimate(j, spec, memo=memo).to_dict()) for j in jobs]

    made = sweep()
    (templates,) = memos[0]._per_job["templates"].values()
    assert [b for b, _ in templates] == [8, 3]  # the first two builds; the four others were made from them
    monkeypatch.setattr(estimator, "_INTERPOLATE", False)
    assert made == sweep()


def _loop(kind, steps, extend_after=None):
    """A decode-like loop: each step makes a tensor a step longer and a fixed one, then frees the last step's.
    With ``extend_after``: steps past that many made by :meth:`Stream.extend` from the last two."""
    s = kind()
    held = [s.alloc(40, "kv"), s.alloc(8, "kv")]
    marks = []
    for k in range(steps):
        if extend_after is not None and k == extend_after:
            d = s.extend(marks[-2], marks[-1], s.mark(), steps - k)
            assert d is not None
            return s, [h + d for h in held]
        marks.append(s.mark())
        t = s.alloc(3, "tmp")
        new = [s.alloc(40 + 16 * (k + 1), "kv"), s.alloc(8, "kv")]
        s.free(t)
        s.free_all(held)
        held = new
    marks.append(s.mark())
    return s, held


@kinds
def test_extend_is_the_loop_built_step_by_step(kind):
    plain, held = _loop(kind, 9)
    for after in (2, 3, 5, 9):
        s, got = _loop(kind, 9, extend_after=after)
        assert (s.ops, s.handles, got) == (plain.ops, plain.handles, held), after
        assert account(s) == account(plain)


def _two_steps(kind, first: int, second: int, third: int, refree_first: bool = False):
    """A stream of one tensor, then two steps that each make the next and free the one before (with
    ``refree_first`` the second step frees the first tensor again instead); the stream and the two steps' marks."""
    s = kind()
    x = s.alloc(first, "kv")
    a = s.mark()
    y = s.alloc(second, "kv")
    s.free(x)
    b = s.mark()
    s.alloc(third, "kv")
    s.free(x if refree_first else y)
    return s, a, b


@kinds
def test_extend_refuses_stretches_that_are_not_one_loop(kind):
    s, a, b = _two_steps(kind, 10, 11, 12, refree_first=True)  # step 2 frees what was not step 1's tensor
    n = len(s.ops)
    assert s.extend(a, b, s.mark(), 3) is None
    assert len(s.ops) == n
    s, a, b = _two_steps(kind, 10, 8, 6)
    assert s.extend(a, b, s.mark(), 2) == 2  # 6 -> 4 -> 2 bytes
    assert s.extend(a, b, s.mark(), 1) is None  # not at the stream's end: the marks are old
    s, a, b = _two_steps(kind, 10, 8, 6)
    assert s.extend(a, b, s.mark(), 3) is None  # the size would reach 0 bytes
    s.phase("decode")
    assert s.extend(a, b, s.mark(), 1) is None


DECODES = [("gemma-3-1b", 512, 256), ("gemma-3-1b", 300, 400), ("gemma-2-2b", 4000, 200), ("olmoe-1b-7b", 64, 40),
           ("llama-3.2-1b", 7, 5), ("phi-3-mini", 1000, 129), ("qwen3-4b", 128, 4)]


@pytest.mark.parametrize("name,prompt,new", DECODES)
@pytest.mark.parametrize("kind", [PyStream, Stream] if Stream is not PyStream else [PyStream])
def test_decode_steps_extended_build_the_same_stream(name, prompt, new, kind, monkeypatch):
    """``generate()``'s decode steps made by :meth:`Stream.extend` (estimator._EXTEND_DECODE) give the stream the
    step-by-step loop builds, also where a sliding window is reached during the decode (gemma at 300 + 400)."""
    spec = load_model(name)
    monkeypatch.setattr(events, "Stream", kind)
    for fit in (False, True):
        job = Job(model=name, task="infer", batch_size=3, prompt_len=prompt, new_tokens=new, precision="bf16-true")
        monkeypatch.setattr(estimator, "_EXTEND_DECODE", False)
        plain = _stream(spec, job, fit=fit)
        monkeypatch.setattr(estimator, "_EXTEND_DECODE", True)
        got = _stream(spec, job, fit=fit)
        assert (got[0].ops, got[0].handles) == (plain[0].ops, plain[0].handles)
        assert got[1:] == plain[1:]


def test_decode_stretches_end_where_a_window_is_reached():
    from memfit.estimator import _decode_stretches

    spec = load_model("gemma-3-1b")  # sliding window 512 on five of six layers
    layers = spec.layer_blocks
    assert _decode_stretches(spec, layers, 300, 400) == [(1, 212), (213, 399)]
    assert _decode_stretches(spec, layers, 512, 256) == [(1, 255)]
    assert _decode_stretches(spec, layers, 2, 1) == []
    assert _decode_stretches(spec, layers, 510, 3) == [(1, 2)]


@kinds
def test_extend_refuses_marks_that_are_not_two_passes(kind):
    s = kind()
    for _ in range(3):
        s.alloc(8, "kv")
    n = len(s.ops)
    end = s.mark()
    assert s.extend((3, 3), (3, 3), end, 2) is None  # no handle made per pass
    assert s.extend((3, 3), (2, 2), (1, 1), 2) is None  # marks running backwards, not the stream's end
    assert s.extend((0, 0), (1, 1), end, -1) is None
    assert len(s.ops) == n and s.handles == 3
    with pytest.raises((TypeError, ValueError)):
        s.extend((0,), (1, 1), end, 1)
