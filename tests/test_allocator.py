"""The caching-allocator model (memfit.allocator) against the rules of PyTorch's source and its recorded runs.

Two levels. Hand-built cases whose bytes follow ``c10/cuda/CUDACachingAllocator.cpp`` step by step (exact:
each expected figure is worked out in the comment from the source's rules). And, once the lead has run
``validation/allocator_cases.py`` on a GPU, every recorded case replayed through the model and compared step
by step with what the real allocator reported: allocated, reserved, segment count, retries, OOMs and where
they happened, exactly (the allocator is deterministic for one stream; there is no tolerance to give).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.allocator import (AllocatorConfig, AllocatorConfigError, AllocatorOutOfMemory, CachingAllocatorModel,
                              round_size, segment_size)
from memfit.allocator.config import _roundup_power2_next_division
from memfit.errors import MemfitError

MiB = 1 << 20
KiB = 1 << 10
RECORD = Path(__file__).resolve().parents[1] / "validation" / "records" / "allocator-cases-h200.json"


# --------------------------------------------------------------------------------------------- sizes
def test_round_size_plain_and_power2():
    assert round_size(1) == 512 and round_size(513) == 1024 and round_size(4 * MiB + 1) == 4 * MiB + 512
    four = AllocatorConfig(roundup_power2_divisions=4)
    assert _roundup_power2_next_division(1200, 4) == 1280  # the source's example: steps 1024, 1280, 1536, 1792
    assert round_size(1200, four) == 1536            # but round_size only uses it above 512 x divisions
    assert round_size(2048, four) == 2048            # a power of two stays
    assert round_size(MiB + 1, four) == MiB + 256 * KiB
    assert round_size(1500, AllocatorConfig(roundup_power2_divisions=4)) == 1536
    assert round_size(2000, AllocatorConfig(roundup_power2_divisions=8)) == 2048  # 2000 <= 512 * 8: plain rounding
    assert segment_size(MiB) == 2 * MiB and segment_size(MiB + 1) == 20 * MiB and segment_size(11 * MiB) == 12 * MiB


# --------------------------------------------------------------------------------------------- config
def test_config_from_env_string():
    c = AllocatorConfig.from_env_string("expandable_segments:True,max_split_size_mb:128")
    assert c.expandable_segments and c.max_split_size_bytes == 128 * MiB
    assert AllocatorConfig.from_env_string("") == AllocatorConfig()
    assert AllocatorConfig.from_env_string(" garbage_collection_threshold : 0.6 ").garbage_collection_threshold == 0.6
    assert AllocatorConfig.from_env_string("roundup_power2_divisions:4").divisions_for(300 * MiB) == 4
    # list form as torch >= 2.9 parses it: the first entry fills below it, each sets its own interval, '>' the rest
    lst = AllocatorConfig.from_env_string("roundup_power2_divisions:[64:8,256:4,>:1]")
    assert lst.roundup_power2_divisions == (8,) * 7 + (0, 4) + (1,) * 7
    assert AllocatorConfig.from_env_string(lst.to_env_string()) == lst
    assert AllocatorConfig.from_env_string("pinned_use_background_threads:True,backend:native") == AllocatorConfig()


@pytest.mark.parametrize("text", [
    "expandable_segments:true",        # torch's True/False are case-sensitive
    "max_split_size_mb:10",            # below 20 MiB (kLargeBuffer): torch rejects it
    "max_split_size_mb",               # no value
    "max_split_size_mb:",              # no value
    "no_such_key:1",
    "garbage_collection_threshold:1.5",
    "roundup_power2_divisions:3",      # not a power of two
    "roundup_power2_divisions:[64:8",  # no closing bracket
    "expandable_segments:True,",       # trailing comma
    "backend:cudaMallocAsync",         # not modelled
])
def test_bad_config_strings_raise_one_line(text):
    with pytest.raises(AllocatorConfigError) as e:
        AllocatorConfig.from_env_string(text)
    assert isinstance(e.value, MemfitError) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- pools and splits
def test_small_pool_packs_and_splits_at_512():
    sim = CachingAllocatorModel()
    blocks = [sim.malloc(100) for _ in range(4)]
    assert sim.allocated == 4 * 512 and sim.reserved == 2 * MiB and sim.num_segments == 1
    sim.free(blocks[1])
    assert sim.malloc(300).addr == blocks[1].addr  # best fit: the 512-byte hole


def test_inactive_split_follows_alloc_found_block_and_free_block():
    sim = CachingAllocatorModel()
    a = sim.malloc(2 * MiB)          # 20 MiB segment split: 18 MiB inactive split block
    assert (sim.inactive_split, sim.inactive_split_bytes) == (1, 18 * MiB)
    b = sim.malloc(2 * MiB)          # the split block shrinks by 2 MiB
    assert (sim.inactive_split, sim.inactive_split_bytes) == (1, 16 * MiB)
    sim.free(a)                      # no free neighbour: a new inactive split block of 2 MiB
    assert (sim.inactive_split, sim.inactive_split_bytes) == (2, 18 * MiB)
    sim.free(b)                      # merges both neighbours: one unsplit 20 MiB block, not "split" any more
    assert (sim.inactive_split, sim.inactive_split_bytes) == (0, 0)


def test_large_blocks_split_only_when_over_1mib_left():
    sim = CachingAllocatorModel()
    b = sim.malloc(2 * MiB)
    sim.free(b)
    big = sim.malloc(19 * MiB + MiB // 2)   # 0.5 MiB would remain: not split, the whole 20 MiB is allocated
    assert big.size == 20 * MiB and sim.allocated == 20 * MiB


def test_max_split_size_rules():
    cfg = AllocatorConfig(max_split_size_bytes=64 * MiB)
    sim = CachingAllocatorModel(config=cfg)
    a = sim.malloc(100 * MiB)
    sim.free(a)                            # cached oversize block of 100 MiB
    small = sim.malloc(30 * MiB)           # below max_split: may not take the oversize block -> new 30 MiB
    assert sim.reserved == 130 * MiB and small.size == 30 * MiB
    mid = sim.malloc(70 * MiB)             # >= max_split, but 100 >= 70 + 20 (max_non_split_rounding): refused
    assert sim.reserved == 200 * MiB
    near = sim.malloc(90 * MiB)            # 100 < 90 + 20: takes it whole, unsplit (size >= max_split)
    assert near.size == 100 * MiB and sim.reserved == 200 * MiB and sim.allocated == 200 * MiB
    for b in (small, mid, near):
        sim.free(b)


# --------------------------------------------------------------------------------------------- limit and OOM
def test_release_cached_and_retry_under_the_limit():
    sim = CachingAllocatorModel(100 * MiB)
    a = sim.malloc(60 * MiB)
    sim.free(a)                           # 60 MiB cached
    b = sim.malloc(80 * MiB)              # 60 + 80 > 100: release the cache, retry: 0 + 80 fits
    assert sim.reserved == 80 * MiB and sim.num_alloc_retries == 1 and sim.num_ooms == 0
    assert sim.num_device_free == 1 and sim.peak_reserved == 80 * MiB
    sim.free(b)


def test_oom_raise_and_record():
    sim = CachingAllocatorModel(100 * MiB, on_oom="raise")
    keep = sim.malloc(60 * MiB)
    with pytest.raises(AllocatorOutOfMemory) as e:
        sim.malloc(50 * MiB)              # 60 + 50 > 100, nothing cached to release
    err = e.value
    assert isinstance(err, MemfitError) and "\n" not in str(err)
    assert (err.requested, err.alloc_size, err.allocated, err.reserved, err.limit) == (
        50 * MiB, 50 * MiB, 60 * MiB, 60 * MiB, 100 * MiB)
    assert "Tried to allocate 50.00 MiB" in str(err) and "100.00 MiB allowed" in str(err)
    assert sim.num_ooms == 1 and sim.num_alloc_retries == 1 and sim.reserved == 60 * MiB
    sim.free(keep)
    rec = CachingAllocatorModel(100 * MiB)  # on_oom="record": counted, and the segment is made anyway
    rec.malloc(60 * MiB)
    rec.malloc(50 * MiB)
    assert rec.oom_requests == 1 and rec.num_ooms == 1 and rec.reserved == 110 * MiB


def test_release_available_cached_blocks_with_max_split():
    sim = CachingAllocatorModel(250 * MiB, config=AllocatorConfig(max_split_size_bytes=64 * MiB))
    a, b = sim.malloc(100 * MiB), sim.malloc(120 * MiB)
    sim.free(a)
    sim.free(b)                           # two cached oversize blocks, 220 MiB reserved
    c = sim.malloc(70 * MiB)              # refused by both (>= 70 + 20); 220 + 70 > 250
    # release_available_cached_blocks frees the smallest oversize block >= 70 MiB (100 MiB), no retry counted
    assert sim.reserved == 190 * MiB and sim.num_alloc_retries == 0 and sim.num_device_free == 1
    sim.free(c)
    sim2 = CachingAllocatorModel(300 * MiB, config=AllocatorConfig(max_split_size_bytes=64 * MiB))
    x, y = sim2.malloc(100 * MiB), sim2.malloc(120 * MiB)
    sim2.free(x)
    sim2.free(y)
    sim2.malloc(150 * MiB)                # no block >= 150: the largest ones go until 150 is covered (120, 100)
    assert sim2.reserved == 150 * MiB and sim2.num_device_free == 2 and sim2.num_alloc_retries == 0


def test_garbage_collection_threshold_frees_old_cached_blocks():
    def run(cfg):
        sim = CachingAllocatorModel(100 * MiB, config=cfg)
        a, b = sim.malloc(30 * MiB), sim.malloc(24 * MiB)
        sim.free(a)
        sim.free(b)
        sim.malloc(40 * MiB)
        return sim
    # 54 MiB reserved > 0.5 x 100: both cached blocks are as old as the average and go before the new segment
    assert run(AllocatorConfig(garbage_collection_threshold=0.5)).reserved == 40 * MiB
    assert run(AllocatorConfig()).reserved == 94 * MiB


def test_empty_cache_keeps_split_segments():
    sim = CachingAllocatorModel()
    a, b = sim.malloc(2 * MiB), sim.malloc(30 * MiB)
    sim.free(b)
    assert sim.release_cached() == 30 * MiB and sim.reserved == 20 * MiB  # a's 20 MiB segment is in use
    sim.free(a)
    assert sim.release_cached() == 20 * MiB and sim.reserved == 0 and sim.num_segments == 0


# --------------------------------------------------------------------------------------------- expandable
def test_expandable_segments_map_pages():
    sim = CachingAllocatorModel(config=AllocatorConfig(expandable_segments=True))
    a = sim.malloc(3 * MiB)          # large pool: one 20 MiB page mapped, 17 MiB split off (>= 512 B)
    assert sim.reserved == 20 * MiB and sim.num_segments == 0
    b = sim.malloc(30 * MiB)         # the free 17 MiB + one more page = 37 MiB, split 30 + 7
    assert sim.reserved == 40 * MiB and b.addr == a.addr + 3 * MiB
    assert [s["blocks"] for s in sim.segments()] == [[(3 * MiB, True), (30 * MiB, True), (7 * MiB, False)]]
    s = sim.malloc(100 * KiB)        # small pool: its own segment, 2 MiB pages
    assert sim.reserved == 42 * MiB
    sim.free(a)
    assert sim.release_cached() == 0  # the 3 MiB hole holds no whole page
    sim.free(b)
    sim.free(s)
    assert sim.release_cached() == 42 * MiB and sim.reserved == 0 and sim.segments() == []


def test_expandable_limit_checks_the_request_not_the_page():
    # alloc_block compares reserved + get_allocation_size(size) with the limit, then maps whole 20 MiB pages
    sim = CachingAllocatorModel(35 * MiB, config=AllocatorConfig(expandable_segments=True), on_oom="raise")
    sim.malloc(12 * MiB)             # 0 + 12 <= 35: maps a 20 MiB page
    sim.malloc(12 * MiB)             # 20 + 12 <= 35: 8 MiB free + one more page: reserved 40 MiB, over the cap
    assert sim.reserved == 40 * MiB
    sim.malloc(12 * MiB)             # the 16 MiB left free takes it
    with pytest.raises(AllocatorOutOfMemory):
        sim.malloc(17 * MiB)         # 40 + 18 (rounded to 2 MiB) > 35, and no whole free page to unmap
    assert sim.num_alloc_retries == 1


# --------------------------------------------------------------------------------------------- API
def test_api_and_no_torch_import():
    sim = CachingAllocatorModel(1 << 30, config=AllocatorConfig(expandable_segments=True), on_oom="raise")
    b = sim.malloc(1000)
    sim.free(b)
    sim.reset_peaks()
    assert sim.peak_allocated == 0 and sim.capacity_bytes == 1 << 30 and sim.oom_requests == 0
    with pytest.raises(ValueError):
        sim.free(b)
    code = "import sys, memfit.allocator, memfit.tracer.allocator; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------- recorded runs
def _replay(case: dict, run: dict, result: dict) -> list[list[int]]:
    """The model's rows for one recorded case: the same columns as the record (``row_columns``)."""
    sim = CachingAllocatorModel(result["allowed_bytes"], config=AllocatorConfig.from_env_string(run["alloc_conf"]),
                                on_oom="raise", device_total_bytes=run["device_total_bytes"])
    live = {}
    rows = []
    for step in case["steps"]:
        oom = 0
        if step[0] == "a":
            try:
                live[step[1]] = sim.malloc(step[2])
            except AllocatorOutOfMemory:
                oom = 1
        elif step[0] == "f":
            b = live.pop(step[1], None)
            if b is not None:
                sim.free(b)
        else:
            sim.release_cached()
        st = sim.memory_stats()
        rows.append([sim.allocated, sim.reserved, st["segment.all.current"], st["num_alloc_retries"],
                     st["num_ooms"], st["inactive_split_bytes.all.current"], st["inactive_split.all.current"],
                     st["num_device_alloc"], st["num_device_free"], oom])
    return rows


def _record() -> dict:
    if not RECORD.exists():
        pytest.skip(f"{RECORD.name} not recorded yet (run validation/allocator_cases.py on a GPU)")
    return json.loads(RECORD.read_text())


def _runs():
    if not RECORD.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{RECORD.name} not recorded yet"))]
    rec = json.loads(RECORD.read_text())
    return [f"{r['config_name']}-{'capped' if r['capped'] else 'free'}" for r in rec["runs"]]


KNOWN_CORE_MISMATCHES = {
    # roundup_power2_divisions:4 makes many equal-size small blocks; which one the real allocator picks
    # depends on the addresses cudaMalloc returned for 2 MiB segments, which the model does not know.
    "roundup4-free": {"small_mix", "small_large_huge"},
    "roundup4-capped": {"small_mix", "small_large_huge"},
}
"""Recorded (run, case) pairs whose allocated/reserved/segments/OOM steps the model does not reproduce yet.
Kept exact both ways: a case that starts to match must be taken off this list."""
KNOWN_SECONDARY_MISMATCHES = {
    **{f"{c}-{p}": {"small_mix"} for c in ("default", "max_split_64", "gc_0.5") for p in ("free", "capped")},
    "roundup4-free": {"small_mix", "small_large_huge"},
    "roundup4-capped": {"small_mix", "small_large_huge"},
}
"""Same for the inactive-split counters: in small_mix the count of inactive split blocks drifts by one
(bytes equal) from the same small-pool address ties."""


def _compare(run_id: str, checked: tuple[str, ...], known: set[str]) -> None:
    rec = _record()
    cols = rec["row_columns"]
    run = next(r for r in rec["runs"] if f"{r['config_name']}-{'capped' if r['capped'] else 'free'}" == run_id)
    assert run["returncode"] == 0, run.get("stderr_tail", "")
    cases = {c["name"]: c for c in rec["cases"]}
    idx = [cols.index(k) for k in checked]  # the model's rows use the record's column order
    mismatched = {}
    for result in run["cases"]:
        got = _replay(cases[result["name"]], run, result)
        for step, (w, g) in enumerate(zip(result["rows"], got)):
            wv = [w[i] for i in idx]
            gv = [g[i] for i in idx]
            if gv != wv:
                mismatched[result["name"]] = (f"step {step} {cases[result['name']]['steps'][step]}: model "
                                              f"{dict(zip(checked, gv))} != real {dict(zip(checked, wv))}")
                break
    unexpected = {k: v for k, v in mismatched.items() if k not in known}
    assert not unexpected, f"{run_id}: {unexpected}"
    assert set(mismatched) == known, f"{run_id}: now matches {sorted(known - set(mismatched))}: update the list"


@pytest.mark.parametrize("run_id", _runs())
def test_recorded_cases_replay_exactly(run_id):
    """Allocated, reserved, segments, retries, OOMs and the steps that raised them: equal at every step."""
    _compare(run_id, ("allocated", "reserved", "segment.all.current", "num_alloc_retries", "num_ooms", "oom"),
             KNOWN_CORE_MISMATCHES.get(run_id, set()))


@pytest.mark.parametrize("run_id", _runs())
def test_recorded_cases_secondary_counters(run_id):
    """Inactive split blocks/bytes and the count of device mallocs/maps and frees/unmaps, at every step."""
    _compare(run_id, ("inactive_split_bytes.all.current", "inactive_split.all.current", "num_device_alloc",
                      "num_device_free"), KNOWN_SECONDARY_MISMATCHES.get(run_id, set()))


# --------------------------------------------------------------------------------------------- invariants
def _check_invariants(sim: CachingAllocatorModel, live: dict) -> None:
    """What must hold after any sequence: the counters equal what the blocks add up to, no two free mapped
    neighbours are left unmerged, every live block is allocated and inside a segment."""
    segs = sim.segments()
    assert sum(s["total_size"] for s in segs) == sim.reserved
    assert sum(s["allocated_size"] for s in segs) == sim.allocated == sum(b.size for b in live.values())
    assert sim.num_segments == sum(1 for s in segs if not s["is_expandable"])
    for s in segs:
        states = [a for _, a in s["blocks"]]
        assert all(a or b for a, b in zip(states, states[1:])), "two free neighbours were not merged"
    pools = (sim._small, sim._large)
    assert sum(len(p.keys) for p in pools) == sum(len(p.by_key) for p in pools)
    split_free = [(sz, a) for s in segs if not s["is_expandable"] and len(s["blocks"]) > 1 for sz, a in s["blocks"]
                  if not a]
    assert sim.inactive_split == len(split_free) and sim.inactive_split_bytes == sum(sz for sz, _ in split_free)
    assert sim.peak_reserved >= sim.reserved and sim.peak_allocated >= sim.allocated


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SIZES = st.one_of(st.integers(1, 2 * MiB), st.integers(MiB, 12 * MiB), st.integers(10 * MiB, 200 * MiB))
_OPS = st.lists(st.tuples(st.sampled_from("aaaffe"), _SIZES, st.integers(0, 10**6)), min_size=1, max_size=120)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, conf=st.sampled_from(["", "expandable_segments:True", "max_split_size_mb:64",
                                       "roundup_power2_divisions:4", "garbage_collection_threshold:0.5"]),
       cap=st.sampled_from([None, 64 * MiB, 400 * MiB]))
def test_any_sequence_keeps_the_books(ops, conf, cap):
    sim = CachingAllocatorModel(cap, config=AllocatorConfig.from_env_string(conf), on_oom="raise")
    live: dict[int, object] = {}
    n = 0
    for op, size, pick in ops:
        if op == "a":
            try:
                live[n] = sim.malloc(size)
            except AllocatorOutOfMemory:
                pass
            n += 1
        elif op == "f" and live:
            sim.free(live.pop(sorted(live)[pick % len(live)]))
        elif op == "e":
            sim.release_cached()
        _check_invariants(sim, live)
        if cap is not None and not sim.config.expandable_segments:
            assert sim.reserved <= cap  # without expandable segments the cap holds exactly
    for b in list(live.values()):
        sim.free(b)
    sim.release_cached()
    assert sim.reserved == 0 and sim.allocated == 0 and sim.segments() == []


_FAKE_TORCH = '''
# A stand-in for torch.cuda backed by memfit's own model. It checks the validation script's plumbing (the
# subprocesses, the cap, the columns the replay reads), never the model: its numbers are the model's.
import os, types
from memfit.allocator import CachingAllocatorModel, AllocatorConfig, AllocatorOutOfMemory
__version__ = "fake"
version = types.SimpleNamespace(cuda="none")
uint8 = "uint8"
class OutOfMemoryError(RuntimeError): pass
TOTAL = 150 << 30
_m = CachingAllocatorModel(None, config=AllocatorConfig.from_env_string(os.environ.get("PYTORCH_CUDA_ALLOC_CONF")),
                           on_oom="raise", device_total_bytes=TOTAL)
class device:
    def __init__(self, *a): pass
class _T:
    def __init__(self, b): self.b = b
    def __del__(self): _m.free(self.b)
def empty(n, dtype=None, device=None):
    try: return _T(_m.malloc(n))
    except AllocatorOutOfMemory as e: raise OutOfMemoryError(str(e))
class cuda:
    init = staticmethod(lambda: None)
    synchronize = staticmethod(lambda *a: None)
    mem_get_info = staticmethod(lambda *a: (TOTAL - _m.reserved, TOTAL))
    empty_cache = staticmethod(lambda: _m.release_cached())
    reset_peak_memory_stats = staticmethod(lambda *a: _m.reset_peaks())
    memory_allocated = staticmethod(lambda *a: _m.allocated)
    memory_reserved = staticmethod(lambda *a: _m.reserved)
    memory_stats = staticmethod(lambda *a: _m.memory_stats())
    get_device_properties = staticmethod(lambda i: types.SimpleNamespace(name="fake", total_memory=TOTAL))
    @staticmethod
    def set_per_process_memory_fraction(f, *a): _m.capacity_bytes = int(f * float(TOTAL))
    @staticmethod
    def reset_accumulated_memory_stats(*a):
        _m.num_alloc_retries = _m.num_ooms = _m.num_device_alloc = _m.num_device_free = 0
'''


def test_validation_script_runs_end_to_end_on_a_stand_in(tmp_path):
    """Plumbing only (a stand-in torch built on the model): the script's subprocesses, caps and columns are
    what the replay above reads, so the GPU run cannot come back in a shape the test does not understand."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text(_FAKE_TORCH)
    env = {"PYTHONPATH": f"{tmp_path / 'fake'}:{root / 'src'}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(root / "validation" / "allocator_cases.py"), "--out", str(tmp_path),
                    "--configs", "expandable,max_split_64"], env=env, check=True, capture_output=True, timeout=300)
    rec = json.loads((tmp_path / "allocator-cases.json").read_text())
    assert [(r["config_name"], r["capped"], r["returncode"]) for r in rec["runs"]] == [
        ("expandable", False, 0), ("expandable", True, 0), ("max_split_64", False, 0), ("max_split_64", True, 0)]
    cases = {c["name"]: c for c in rec["cases"]}
    assert rec["row_columns"][:2] == ["allocated", "reserved"] and rec["row_columns"][-1] == "oom"
    capped_ooms = 0
    for run in rec["runs"]:
        for result in run["cases"]:
            assert len(result["rows"]) == len(cases[result["name"]]["steps"])
            assert _replay(cases[result["name"]], run, result) == result["rows"]
            capped_ooms += sum(r[-1] for r in result["rows"]) if run["capped"] else 0
    assert capped_ooms > 0  # the caps do reach the OOM path
