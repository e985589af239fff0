"""How much of an estimate's allocator replay an exact periodicity shortcut could skip (a measurement, not a test).

The idea evaluated: N identical decoder layers emit the same block of ops N times (same sizes, shifted
handles). If the allocator's decision-relevant state before block k is the state before an earlier block k - q
up to a relabelling of blocks, block k makes the same decisions, and the rest of the run of identical blocks
could be applied without simulating each op. This script finds the runs of identical blocks in each benchmark
stream (ops compared by kind and size; at each op the smallest period that repeats, kept when its block comes
at least 3 times in a row) and replays the stream through the allocator model, comparing at each block
boundary the relevant state with the state 1..8 blocks earlier, for each pool: the segments that hold a free
block or a block the coming block frees, in address order, each as its blocks' (size, free / allocated /
freed by op j of the block).

Prints, for each stream: the events in runs of identical blocks, and the events in blocks whose state matched
an earlier boundary in both pools (the most such a shortcut could skip, before the cost of checking and of
materialising the skipped blocks' segments).

    PYTHONPATH=src python benchmarks/replay_periodicity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.allocator import CachingAllocatorModel  # noqa: E402
from memfit.estimator import _stream  # noqa: E402
from memfit.models import load_model  # noqa: E402

CASES = (("llama-3.1-8b", {}), ("qwen3-30b-a3b", {"method": "lora"}), ("deepseek-v3", {}),
         ("gemma-3-1b", {"task": "infer", "new_tokens": 256}))


def runs_of_identical_blocks(ops: list[tuple], max_period: int = 400) -> list[tuple[int, int, int]]:
    """(start, period, repeats) of the runs of >= 3 identical blocks, scanning left to right: at each op the
    smallest period whose block comes twice in a row, then as many repeats of it as follow."""
    size: dict[int, int] = {}
    sig = []
    for op in ops:
        if op[0] == 0:
            size[op[1]] = op[2]
            sig.append((0, op[2]))
        elif op[0] == 1:
            sig.append((1, size[op[1]]))
        else:
            sig.append(op)
    out = []
    i, n = 0, len(sig)
    while i < n:
        found = None
        for p in range(1, min(max_period, (n - i) // 2) + 1):
            if sig[i:i + p] == sig[i + p:i + 2 * p]:
                r = 2
                while sig[i:i + p] == sig[i + r * p:i + (r + 1) * p]:
                    r += 1
                found = (p, r)
                break
        if found and found[1] >= 3:
            out.append((i, *found))
            i += found[0] * found[1]
        else:
            i += 1
    return out


def pool_state(model: CachingAllocatorModel, blocks: dict, block_ops: list[tuple], small: bool) -> tuple:
    """One pool's decision-relevant state before ``block_ops`` (see the module docstring)."""
    internal, ext = set(), {}
    for j, op in enumerate(block_ops):
        if op[0] == 0:
            internal.add(op[1])
        elif op[0] == 1 and op[1] not in internal:
            ext[id(blocks[op[1]])] = j
    pool = model._small if small else model._large
    anchors = list(pool.by_key.values()) + [blocks[h] for h in
                                            (op[1] for op in block_ops if op[0] == 1 and op[1] not in internal)
                                            if blocks[h].small == small]
    firsts = {}
    for b in anchors:
        while b.prev is not None:
            b = b.prev
        firsts[b.addr] = b
    out = []
    for addr in sorted(firsts):
        b, seg = firsts[addr], []
        while b is not None:
            seg.append((b.size, "free" if not b.allocated else ext.get(id(b), "allocated")))
            b = b.next
        out.append(tuple(seg))
    return tuple(out)


def measure(ops: list[tuple]) -> tuple[int, int]:
    runs = runs_of_identical_blocks(ops)
    at: dict[int, tuple[int, int]] = {}
    for start, p, r in runs:
        for k in range(r):
            at[start + k * p] = (start, p)
    in_runs = sum(p * r for _, p, r in runs)
    model = CachingAllocatorModel(None, on_oom="raise")
    blocks: dict = {}
    history: dict[int, list[tuple]] = {}
    skippable = 0
    for i, op in enumerate(ops):
        if i in at:
            start, p = at[i]
            state = tuple(pool_state(model, blocks, ops[i:i + p], small) for small in (True, False))
            seen = history.setdefault(start, [])
            if any(state == old for old in seen[-8:]):
                skippable += p
            seen.append(state)
        if op[0] == 0:
            blocks[op[1]] = model.malloc(op[2])
        elif op[0] == 1:
            model.free(blocks.pop(op[1]))
    return in_runs, skippable


def main() -> None:
    for model, kw in CASES:
        stream = _stream(load_model(model), Job(model=model, **kw))[0]
        n = len(stream.ops)
        in_runs, skippable = measure(stream.ops)
        print(f"{model:16s} {n:7d} events: {in_runs:7d} in runs of identical blocks ({in_runs / n:5.1%}), "
              f"{skippable:7d} in blocks whose allocator state repeats ({skippable / n:5.1%})")


if __name__ == "__main__":
    main()
