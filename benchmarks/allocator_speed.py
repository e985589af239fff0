"""Speed of the caching-allocator model: ns per malloc/free on the validation cases' sequences, per setting.

The estimator replays a few thousand events per estimate within ~2 ms, so a malloc or free should cost well
under a microsecond. Run: python benchmarks/allocator_speed.py
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "validation"))

from allocator_cases import build_cases  # noqa: E402

from memfit.allocator import AllocatorConfig, AllocatorOutOfMemory, CachingAllocatorModel  # noqa: E402

SETTINGS = {"default": "", "expandable": "expandable_segments:True", "max_split_64": "max_split_size_mb:64"}


def replay(steps, config, cap=None) -> int:
    sim = CachingAllocatorModel(cap, config=config, on_oom="raise")
    live = {}
    malloc, free = sim.malloc, sim.free
    n = 0
    for st in steps:
        if st[0] == "a":
            try:
                live[st[1]] = malloc(st[2])
            except AllocatorOutOfMemory:
                pass
        elif st[0] == "f":
            b = live.pop(st[1], None)
            if b is not None:
                free(b)
        else:
            sim.release_cached()
        n += 1
    return n


def ns_per_op(steps, config, cap=None, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()  # CPU time: the machine may be shared, wall time would count waiting
        n = replay(steps, config, cap)
        best = min(best, (time.process_time() - t) / n * 1e9)
    return best


def baseline_ns(n: int = 200_000) -> float:
    """CPU ns of a trivial Python loop step (a dict set and delete): the scale of this machine."""
    d = {}
    t = time.process_time()
    for i in range(n):
        d[i] = i
        del d[i]
    return (time.process_time() - t) / n * 1e9


def main() -> None:
    cases = build_cases()
    base = baseline_ns()
    print(f"baseline: {base:.0f} ns per trivial loop step (dict set + delete) on this machine; an idle modern core "
          "takes about 30-40 ns, so divide by base/35 for an unloaded figure")
    print(f"{'case':20s} {'steps':>6s} " + " ".join(f"{k:>14s}" for k in SETTINGS) + "   (ns per op, best of 5)")
    for c in cases:
        row = [ns_per_op(c["steps"], AllocatorConfig.from_env_string(v)) for v in SETTINGS.values()]
        print(f"{c['name']:20s} {len(c['steps']):6d} " + " ".join(f"{x:14.0f}" for x in row))
    print("capped runs (release-and-retry and OOM paths):")
    for c in cases:
        row = [ns_per_op(c["steps"], AllocatorConfig.from_env_string(v), c["cap_bytes"]) for v in SETTINGS.values()]
        print(f"{c['name']:20s} {len(c['steps']):6d} " + " ".join(f"{x:14.0f}" for x in row))


if __name__ == "__main__":
    main()
