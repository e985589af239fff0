"""The compiled replay (src/memfit/allocator/_replay.c) is the allocator model: every figure of
``replay_ops`` with it equals the Python ``CachingAllocatorModel.run`` of the same operations, with and without a
limit, on random streams and on the estimator's own."""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path

import pytest

from memfit import Job
from memfit.allocator import AllocatorConfig, CachingAllocatorModel, model as allocator_model, replay_ops
from memfit.estimator import _stream
from memfit.models import load_model

COMPILED = allocator_model.COMPILED
needs_compiled = pytest.mark.skipif(COMPILED is None, reason="the compiled replay is not built (no C compiler)")


SETTINGS = {"default": AllocatorConfig(), "expandable": AllocatorConfig(expandable_segments=True),
            "expandable, 64 MiB pages": AllocatorConfig(expandable_segments=True, large_segment_bytes=64 << 20)}


def _python(ops, capacity, cfg=None, total=None, order="down"):
    m = CachingAllocatorModel(capacity, config=cfg, on_oom="raise", device_total_bytes=total, large_addresses=order)
    index = m.run(ops)
    return (index, *(getattr(m, k) for k in allocator_model._STATS))


def _compiled(ops, capacity, cfg=None, total=None, order="down"):
    r = replay_ops(ops, capacity, config=cfg, device_total_bytes=total, large_addresses=order)
    assert r.compiled
    return (r.index, *(getattr(r, k) for k in allocator_model._STATS))


def _random_ops(rng: random.Random, n: int) -> list[tuple]:
    """Small, 1-10 MiB and large requests, sizes repeated (equal sizes break ties by address), frees in any
    order, phase marks and resets (skipped by the replay)."""
    sizes = [rng.choice((rng.randrange(1, 4096), rng.randrange(4096, 1 << 20), rng.randrange(1 << 20, 10 << 20),
                         rng.randrange(10 << 20, 400 << 20), 1 << 20, 2 << 20, 20 << 20)) for _ in range(30)]
    live: list[int] = []
    ops: list[tuple] = []
    h = 0
    for _ in range(n):
        r = rng.random()
        if live and r < 0.45:
            ops.append((1, live.pop(rng.randrange(len(live)))))
        elif r < 0.47:
            ops.append((2, "phase"))
        elif r < 0.48:
            ops.append((3,))
        else:
            ops.append((0, h, rng.choice(sizes), "x"))
            live.append(h)
            h += 1
    return ops


def test_the_compiled_replay_is_built_where_a_compiler_is():
    """pip builds it (setup.py, optional) wherever a C compiler and Python's headers are: CI must not pass on
    the slow path without saying so."""
    has_cc = shutil.which("cc") or shutil.which("gcc")
    has_headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    if not (has_cc and has_headers):
        pytest.skip("no C compiler or Python headers here")
    if __import__("os").environ.get("MEMFIT_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("MEMFIT_PURE_PYTHON is set")
    assert COMPILED is not None, "memfit.allocator._replay is not built: run `pip install -e .` again"


@needs_compiled
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("seed", range(30))
def test_random_streams_match_the_model(seed, setting):
    rng = random.Random(seed)
    cfg = SETTINGS[setting]
    ops = _random_ops(rng, rng.choice((50, 400, 3000)))
    # a small device (its expandable segments' address space fills up: new segments) now and then
    total = rng.choice((None, None, 1 << 30))
    free_run = _python(ops, None, cfg, total)
    assert _compiled(ops, None, cfg, total) == free_run
    peak = free_run[5]
    for cap in (0, 1 << 20, peak // 3, peak // 2, peak - (2 << 20), peak - 1, peak, peak + (20 << 20)):
        assert _compiled(ops, cap, cfg, total) == _python(ops, cap, cfg, total), cap


@needs_compiled
@pytest.mark.parametrize("seed", range(20))
def test_increasing_large_addresses_match_the_model(seed):
    """``large_addresses="up"`` (the fit verdict's second order for training runs): compiled and Python agree,
    and the order changes which equal-size block a request takes, not what is asked for."""
    rng = random.Random(1000 + seed)
    ops = _random_ops(rng, rng.choice((400, 3000)))
    free_run = _python(ops, None, order="up")
    assert _compiled(ops, None, order="up") == free_run
    k = 1 + allocator_model._STATS.index("peak_requested")
    assert free_run[k] == _python(ops, None)[k]  # the same requests either way (blocks may round differently)
    peak = free_run[5]
    for cap in (1 << 20, peak // 2, peak - (2 << 20), peak - 1, peak):
        assert _compiled(ops, cap, order="up") == _python(ops, cap, order="up"), cap


def test_large_addresses_is_checked():
    with pytest.raises(ValueError, match="large_addresses"):
        CachingAllocatorModel(None, large_addresses="sideways")
    with pytest.raises(ValueError, match="large_addresses"):
        replay_ops([], None, large_addresses="sideways")


@needs_compiled
@pytest.mark.parametrize("setting", ["default", "expandable"])
@pytest.mark.parametrize("model,kw", [("llama-3.2-1b", {}),
                                      ("qwen2.5-0.5b", {"method": "lora", "gradient_checkpointing": True}),
                                      ("olmoe-1b-7b", {"method": "lora"}),
                                      ("gemma-3-1b", {"task": "infer", "new_tokens": 32, "batch_size": 4})])
def test_estimator_streams_match_the_model(model, kw, setting):
    cfg = SETTINGS[setting]
    ops = _stream(load_model(model), Job(model=model, **kw))[0].ops
    free_run = _python(ops, None, cfg)
    assert _compiled(ops, None, cfg) == free_run
    peak = free_run[5]
    for frac in (0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        cap = int(peak * frac)
        assert _compiled(ops, cap, cfg) == _python(ops, cap, cfg), frac
        if setting == "default":
            assert _compiled(ops, cap, cfg, order="up") == _python(ops, cap, cfg, order="up"), frac


def test_other_settings_use_the_python_model():
    ops = [(0, 0, 3 << 20, "x"), (1, 0), (0, 1, 5 << 20, "x")]
    for text in ("max_split_size_mb:64", "roundup_power2_divisions:4", "garbage_collection_threshold:0.6",
                 "expandable_segments:True,max_split_size_mb:64"):
        r = replay_ops(ops, 1 << 30, config=AllocatorConfig.from_env_string(text))
        assert not r.compiled
        m = CachingAllocatorModel(1 << 30, config=AllocatorConfig.from_env_string(text), on_oom="raise")
        assert m.run(ops) == r.index and m.peak_reserved == r.peak_reserved


def test_power_of_two_rounding_is_not_the_plain_path():
    """``roundup_power2_divisions`` rounds requests differently: ``run`` must not take its 512-byte path (it did)."""
    cfg = AllocatorConfig.from_env_string("roundup_power2_divisions:4")
    ops = [(0, 0, (1 << 20) + 4097, "x")]
    m = CachingAllocatorModel(None, config=cfg)
    m.run(ops)
    one = CachingAllocatorModel(None, config=cfg)
    one.malloc((1 << 20) + 4097)
    assert m.allocated == one.allocated


@needs_compiled
def test_bad_streams_are_errors_not_crashes():
    with pytest.raises(KeyError):
        replay_ops([(1, 5)])
    with pytest.raises(ValueError):
        replay_ops([(0, -1, 10, "x")])
    with pytest.raises(TypeError):
        replay_ops([[0, 1, 10]])


@needs_compiled
def test_sizes_past_64_bits_take_the_python_model():
    ops = [(0, 0, 1 << 70, "x"), (0, 1, 1 << 57, "x"), (1, 0)]
    r = replay_ops(ops, None)
    assert not r.compiled and r.peak_allocated == _python(ops, None)[4]


@needs_compiled
@pytest.mark.parametrize("setting", SETTINGS)
def test_thousands_of_free_blocks_match_the_model(setting):
    """Thousands of free blocks (a pool of many chunks in the compiled replay, split as they fill and dropped as
    they empty): the same answers."""
    rng = random.Random(7)
    cfg = SETTINGS[setting]
    ops: list[tuple] = []
    h = 0
    for pool_sizes in ((512, 1 << 20), (12 << 20, 40 << 20)):
        first = h
        for _ in range(2600):  # neighbours in few segments; every other one freed: thousands of free blocks
            ops.append((0, h, rng.randrange(*pool_sizes), "x"))
            h += 1
        ops += [(1, k) for k in range(first, h, 2)]
    live = [k for k in range(1, h, 2)]
    for _ in range(4000):
        if live and rng.random() < 0.5:
            ops.append((1, live.pop(rng.randrange(len(live)))))
        else:
            ops.append((0, h, rng.choice((rng.randrange(512, 1 << 20), rng.randrange(1 << 20, 60 << 20))), "x"))
            live.append(h)
            h += 1
    free_run = _python(ops, None, cfg)
    assert _compiled(ops, None, cfg) == free_run
    peak = free_run[5]
    for frac in (0.3, 0.7, 0.9, 0.99):
        cap = int(peak * frac)
        assert _compiled(ops, cap, cfg) == _python(ops, cap, cfg), frac


def _recorded_runs():
    import json

    path = Path(__file__).resolve().parents[1] / "validation" / "records" / "allocator-cases-h200.json"
    rec = json.loads(path.read_text())
    steps = {c["name"]: c["steps"] for c in rec["cases"]}
    for run in rec["runs"]:
        if run["alloc_conf"] not in ("", "expandable_segments:True"):
            continue
        for case in run["cases"]:
            if any(s[0] == "e" for s in steps[case["name"]]):  # empty_cache(): not an operation of a stream
                continue
            yield run, case, steps[case["name"]]


@needs_compiled
def test_the_compiled_replay_is_the_real_allocator_on_the_h200_record():
    """validation/records/allocator-cases-h200.json: PyTorch's allocator (torch 2.11, H200) on scripted
    sequences, with and without a cap. The compiled replay ends where the real run first ran out of memory,
    with its allocated and reserved bytes and retries there; without one, with its final figures and peak."""
    seen = 0
    for run, case, steps in _recorded_runs():
        ops = [(0, s[1], s[2], "x") if s[0] == "a" else (1, s[1]) for s in steps]
        r = replay_ops(ops, case["allowed_bytes"], config=AllocatorConfig.from_env_string(run["alloc_conf"]),
                       device_total_bytes=run["device_total_bytes"])
        assert r.compiled
        rows = case["rows"]  # allocated, reserved, segments, retries, ..., oom: after each step
        oom = next((i for i, row in enumerate(rows) if row[-1]), None)
        where = (run["config_name"], run["capped"], case["name"])
        if oom is None:
            assert (r.index, r.allocated, r.reserved, r.peak_reserved) == (
                -1, rows[-1][0], rows[-1][1], case["peaks"]["reserved_bytes.all.peak"]), where
        else:
            assert (r.index, r.allocated, r.reserved, r.num_alloc_retries) == (
                oom, rows[oom][0], rows[oom][1], rows[oom][3]), where
        seen += 1
    assert seen == 24


@needs_compiled
def test_stream_replays_run_side_by_side_and_stop_when_cancelled():
    # the compiled replay of an estimator stream runs without the GIL (the planner replays the other order of
    # segment addresses on a worker thread): replays in two threads at once give the figures of one at a time,
    # and a set cancel byte stops a replay (None)
    import threading

    spec = load_model("qwen2.5-0.5b")
    stream = _stream(spec, Job(model="qwen2.5-0.5b", batch_size=4, seq_len=512))[0]
    cap = 6 << 30
    alone = {o: replay_ops(stream, cap, large_addresses=o) for o in ("down", "up")}
    got: dict = {}
    threads = [threading.Thread(target=lambda o=o: got.__setitem__(o, replay_ops(stream, cap, large_addresses=o)))
               for o in ("down", "up") for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    stop = bytearray(b"\x01")
    assert replay_ops(stream, cap, cancel=stop) is None
    assert replay_ops(stream, cap, cancel=bytearray(1)) == alone["down"]
    with pytest.raises(ValueError):
        replay_ops(stream, cap, cancel=bytearray())
