"""Scripted allocation sequences run through PyTorch's real CUDA caching allocator, to check memfit's model.

Each case is a list of steps: allocate ``n`` bytes (``torch.empty(n, dtype=torch.uint8, device="cuda")``), free
a tensor (``del``) or ``torch.cuda.empty_cache()``. The cases are built here without torch (a seeded
``random.Random``), stored in the output with their steps, and each is run under several
``PYTORCH_CUDA_ALLOC_CONF`` settings (each setting in its own subprocess: the variable is read when CUDA
initialises), without and then with a cap (``torch.cuda.set_per_process_memory_fraction``). After every step the
worker records ``memory_allocated``, ``memory_reserved`` and ``memory_stats()`` counters (segments, retries,
OOMs, inactive split bytes, device mallocs/frees), and whether that step raised ``torch.OutOfMemoryError``
(the tensor is then not made and the case goes on). ``tests/test_allocator.py`` replays every case of the
recorded file through :class:`memfit.allocator.CachingAllocatorModel` and compares step by step.

The KV-cache case reproduces what ``torch.cat([past, new])`` asks the allocator for (the grown tensor while
the old one is alive, then the old one freed), with ``torch.empty`` calls of those sizes.

Run on one GPU (about a minute): ``python validation/allocator_cases.py --out $OUT`` (writes
``$OUT/allocator-cases.json``). ``--list`` prints the cases and their sizes without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

CONFIGS = {
    "default": "",
    "max_split_64": "max_split_size_mb:64",
    "expandable": "expandable_segments:True",
    "roundup4": "roundup_power2_divisions:4",
    "gc_0.5": "garbage_collection_threshold:0.5",
}
"""Allocator settings, one subprocess each. The GC setting only acts under a cap (``set_fraction``)."""


# ------------------------------------------------------------------------------------------------ cases
class _Steps:
    """Builds a case's steps: ``["a", id, nbytes]``, ``["f", id]``, ``["e"]`` (empty_cache)."""

    def __init__(self) -> None:
        self.steps: list[list] = []
        self._next = 0
        self.live: list[int] = []

    def alloc(self, nbytes: int) -> int:
        i = self._next
        self._next += 1
        self.steps.append(["a", i, int(nbytes)])
        self.live.append(i)
        return i

    def free(self, i: int) -> None:
        self.steps.append(["f", i])
        self.live.remove(i)

    def free_all(self) -> None:
        for i in list(self.live):
            self.free(i)


def case_small_mix(rng: random.Random) -> _Steps:
    """Small-pool traffic: 400 requests of 1 B .. 1 MiB, a third freed at random as it goes."""
    s = _Steps()
    for _ in range(400):
        s.alloc(rng.choice([rng.randint(1, 4 * KiB), rng.randint(4 * KiB, 256 * KiB), rng.randint(256 * KiB, MiB)]))
        if s.live and rng.random() < 0.35:
            s.free(rng.choice(s.live))
    return s


def case_large_mix(rng: random.Random) -> _Steps:
    """Large-pool traffic: 1-10 MiB requests (20 MiB segments) and 10-80 MiB ones (own segments)."""
    s = _Steps()
    for _ in range(250):
        if rng.random() < 0.6:
            s.alloc(rng.randint(MiB + 1, 10 * MiB - 1))
        else:
            s.alloc(rng.randint(10 * MiB, 80 * MiB))
        if s.live and rng.random() < 0.45:
            s.free(rng.choice(s.live))
    return s


def case_small_large_huge(rng: random.Random) -> _Steps:
    """All three: small and mid requests around a few 150-700 MiB ones (oversize under max_split_size)."""
    s = _Steps()
    for _ in range(160):
        r = rng.random()
        if r < 0.4:
            s.alloc(rng.randint(1, MiB))
        elif r < 0.75:
            s.alloc(rng.randint(MiB, 40 * MiB))
        else:
            s.alloc(rng.randint(150 * MiB, 700 * MiB))
        if len(s.live) > 3 and rng.random() < 0.5:
            s.free(rng.choice(s.live))
    return s


def case_kv_growth(rng: random.Random) -> _Steps:
    """A KV cache grown by concatenation, as ``DynamicCache`` does in ``generate()``: 8 layers x (K, V),
    each token makes every layer's K and V one token longer (new tensor, then the old one freed), with a
    few small temporaries per token. Prompt 300 tokens, then 120 new tokens; 16 KiB per token per tensor."""
    s = _Steps()
    per_token = 16 * KiB
    kv = {}
    length = 300
    for layer in range(8):
        for t in "KV":
            kv[layer, t] = s.alloc(length * per_token)
    for _ in range(120):
        tmp = [s.alloc(rng.randint(2 * KiB, 600 * KiB)) for _ in range(3)]
        length += 1
        for layer in range(8):
            for t in "KV":
                new = s.alloc(length * per_token)
                s.free(kv[layer, t])
                kv[layer, t] = new
        for i in tmp:
            s.free(i)
    return s


def case_layer_activations(rng: random.Random) -> _Steps:
    """A layer-activation pattern: 16 layers' forward keeps two activations and frees a temporary, backward
    frees them in reverse while making gradients; two training steps."""
    s = _Steps()
    weights = [s.alloc(rng.choice([12 * MiB, 36 * MiB, 48 * MiB])) for _ in range(16)]
    for _step in range(2):
        saved = []
        for _layer in range(16):
            a = s.alloc(24 * MiB)
            b = s.alloc(6 * MiB + 4096)
            t = s.alloc(96 * MiB)
            saved.append((a, b))
            s.free(t)
        grads = []
        for a, b in reversed(saved):
            g = s.alloc(24 * MiB)
            s.free(a)
            s.free(b)
            grads.append(s.alloc(3 * MiB))
            s.free(g)
        for g in grads:
            s.free(g)
    for w in weights:
        s.free(w)
    return s


def case_fragment(rng: random.Random) -> _Steps:
    """Fragmenting interleavings: 24 blocks of 30 MiB, every other freed, then 40 MiB requests (no hole
    fits), 25 MiB ones (holes, with waste), 12 MiB ones (split holes), and an empty_cache in the middle."""
    s = _Steps()
    blocks = [s.alloc(30 * MiB) for _ in range(24)]
    for b in blocks[::2]:
        s.free(b)
    big = [s.alloc(40 * MiB) for _ in range(6)]
    mid = [s.alloc(25 * MiB) for _ in range(6)]
    small = [s.alloc(12 * MiB + rng.randint(0, MiB)) for _ in range(8)]
    for b in big[::2] + mid[1::2]:
        s.free(b)
    s.steps.append(["e"])
    for _ in range(10):
        s.alloc(rng.randint(5 * MiB, 60 * MiB))
    for b in small[:4]:
        s.free(b)
    for _ in range(6):
        s.alloc(rng.randint(MiB, 9 * MiB))
    return s


def case_batch_growth(rng: random.Random) -> _Steps:
    """Note [Expandable Segments]'s example: batches of N = 6, 7, 8, 9 make tensors of N*A and N*A*B bytes
    in 12 layers; each batch's tensors are freed before the next batch."""
    s = _Steps()
    a_bytes, b = 2 * MiB + 3 * KiB, 5
    for n in (6, 7, 8, 9, 8):
        ids = []
        for _layer in range(12):
            ids.append(s.alloc(n * a_bytes))
            ids.append(s.alloc(n * a_bytes * b))
        for i in ids:
            s.free(i)
    return s


CASE_BUILDERS = {
    "small_mix": (case_small_mix, 11),
    "large_mix": (case_large_mix, 12),
    "small_large_huge": (case_small_large_huge, 13),
    "kv_growth": (case_kv_growth, 14),
    "layer_activations": (case_layer_activations, 15),
    "fragment": (case_fragment, 16),
    "batch_growth": (case_batch_growth, 17),
}

CAPS = {
    "small_mix": 48 * MiB,
    "large_mix": 2560 * MiB,
    "small_large_huge": 6 * GiB,
    "kv_growth": 120 * MiB,
    "layer_activations": 900 * MiB,
    "fragment": 900 * MiB,
    "batch_growth": 1200 * MiB,
}
"""The cap of each case's capped run (the bytes ``set_per_process_memory_fraction`` should allow), set
below the case's uncapped peak so that the release-and-retry path and OOMs happen."""


def build_cases() -> list[dict]:
    """Every case: name, steps (JSON-ready) and the cap of its capped run."""
    out = []
    for name, (fn, seed) in CASE_BUILDERS.items():
        s = fn(random.Random(seed))
        s.free_all()
        out.append({"name": name, "doc": (fn.__doc__ or "").strip().split("\n")[0], "cap_bytes": CAPS[name],
                    "steps": s.steps})
    return out


# ------------------------------------------------------------------------------------------------ worker
STAT_KEYS = ["segment.all.current", "num_alloc_retries", "num_ooms", "inactive_split_bytes.all.current",
             "inactive_split.all.current", "num_device_alloc", "num_device_free"]
ROW = ["allocated", "reserved", *STAT_KEYS, "oom"]
"""The columns of each step's record."""


def worker(cases: list[dict]) -> dict:  # pragma: no cover - needs a GPU
    """Run every case uncapped, then every case capped (once a fraction is set it stays set, so the
    uncapped pass goes first); the allocator is emptied and its counters reset before each case."""
    import torch

    torch.cuda.init()
    dev = torch.device("cuda", 0)
    torch.empty(1, device=dev)  # CUDA context up; freed at once
    torch.cuda.synchronize()
    free0, total = torch.cuda.mem_get_info(dev)
    passes = []
    for capped in (False, True):
        results = []
        for case in cases:
            torch.cuda.empty_cache()
            allowed = None
            if capped:
                fraction = case["cap_bytes"] / total
                torch.cuda.set_per_process_memory_fraction(fraction, dev)
                allowed = int(fraction * float(total))  # setMemoryFraction: static_cast<size_t>(fraction * total)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.reset_accumulated_memory_stats(dev)
            start = (torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev))
            live: dict[int, object] = {}
            rows = []
            t0 = time.perf_counter()
            for step in case["steps"]:
                oom = 0
                if step[0] == "a":
                    try:
                        live[step[1]] = torch.empty(step[2], dtype=torch.uint8, device=dev)
                    except torch.OutOfMemoryError:
                        oom = 1
                elif step[0] == "f":
                    live.pop(step[1], None)
                else:
                    torch.cuda.empty_cache()
                st = torch.cuda.memory_stats(dev)
                rows.append([torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev),
                             *(int(st.get(k, 0)) for k in STAT_KEYS), oom])
            live.clear()
            st = torch.cuda.memory_stats(dev)
            results.append({
                "name": case["name"], "allowed_bytes": allowed, "fraction_set": capped,
                "start_allocated_reserved": list(start), "rows": rows,
                "peaks": {"allocated_bytes.all.peak": int(st["allocated_bytes.all.peak"]),
                          "reserved_bytes.all.peak": int(st["reserved_bytes.all.peak"]),
                          "segment.all.peak": int(st.get("segment.all.peak", 0))},
                "seconds": round(time.perf_counter() - t0, 3),
            })
            torch.cuda.empty_cache()
        passes.append({"capped": capped, "cases": results})
    return {"device_total_bytes": int(total), "device_free_at_start_bytes": int(free0), "passes": passes}


def _env_info() -> dict:  # pragma: no cover - needs a GPU
    import torch

    props = torch.cuda.get_device_properties(0)
    driver = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": props.name,
            "gpu_total_memory_bytes": int(props.total_memory), "driver": driver, "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="folder for allocator-cases.json")
    ap.add_argument("--list", action="store_true", help="print the cases (no GPU needed)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cases = build_cases()
    if args.list:
        for c in cases:
            n_alloc = sum(1 for s in c["steps"] if s[0] == "a")
            total = sum(s[2] for s in c["steps"] if s[0] == "a")
            print(f"{c['name']:20s} {len(c['steps']):5d} steps {n_alloc:5d} allocs {total / GiB:7.2f} GiB requested "
                  f"cap {c['cap_bytes'] / MiB:.0f} MiB  {c['doc']}")
        return 0
    if args.worker:  # pragma: no cover - needs a GPU
        res = worker(cases)
        Path(args.result).write_text(json.dumps(res))
        return 0
    if not args.out:
        ap.error("--out is required")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"what": "PyTorch CUDA caching allocator on scripted allocation sequences (memfit allocator check)",
              "script": "validation/allocator_cases.py", "env": _env_info(), "row_columns": ROW,
              "cases": [{k: c[k] for k in ("name", "doc", "cap_bytes", "steps")} for c in cases], "runs": []}
    t0 = time.perf_counter()
    for cname in args.configs.split(","):
        conf = CONFIGS[cname]
        res_path = out_dir / f".alloc-{cname}.json"
        env = dict(os.environ)
        env.pop("PYTORCH_ALLOC_CONF", None)
        env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        if not conf:
            env.pop("PYTORCH_CUDA_ALLOC_CONF")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--worker", "--result", str(res_path)], env=env,
                           capture_output=True, text=True, timeout=300)
        seconds = round(time.perf_counter() - t, 2)
        res = json.loads(res_path.read_text()) if p.returncode == 0 else None
        if res is not None:
            res_path.unlink()
        for capped in (False, True):
            run = {"config_name": cname, "alloc_conf": conf, "capped": capped, "returncode": p.returncode,
                   "seconds": seconds}
            if res is not None:
                run["device_total_bytes"] = res["device_total_bytes"]
                run["device_free_at_start_bytes"] = res["device_free_at_start_bytes"]
                run["cases"] = res["passes"][int(capped)]["cases"]
            else:
                run["stderr_tail"] = p.stderr[-3000:]
            record["runs"].append(run)
        print(f"{cname:14s} rc={p.returncode} {seconds:.1f}s", flush=True)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    path = out_dir / "allocator-cases.json"
    path.write_text(json.dumps(record, separators=(",", ":")))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {record['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
