"""How long `memfit trace` takes for a full training step: Llama 3.2 1B and Llama 3.1 8B, bf16-mixed, AdamW,
batch 1, 2048 tokens. The targets (issue): 8B <= 60 s and 1B <= 10 s on a 2-core machine with a few GiB of memory.

Run: ``python benchmarks/trace_speed.py [MODEL ...]``. Each model is traced in a fresh process, so the time
includes importing torch and transformers, as a user's ``memfit trace`` run does; the in-process trace time
and the process's peak resident memory are printed too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MODELS = ("llama-3.2-1b", "llama-3.1-8b")
TARGET_S = {"llama-3.2-1b": 10.0, "llama-3.1-8b": 60.0}

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from memfit import Job
from memfit.tracer import trace
job = Job(model=sys.argv[1], precision="bf16-mixed", optimizer="adamw", batch_size=1, seq_len=2048)
t1 = time.perf_counter()
bd = trace(job, fallback=False)
t2 = time.perf_counter()
print(json.dumps({"engine": bd.engine, "import_s": t1 - t0, "trace_s": t2 - t1,
                  "peak_gib": bd.peak_allocated_bytes / 2**30, "peak_phase": bd.peak_phase,
                  "events": bd.extras.get("timeline_events"),
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str]) -> int:
    models = argv or list(MODELS)
    print(f"{os.cpu_count()} CPU cores; python {sys.version.split()[0]}")
    print(f"{'model':16s} {'total s':>8s} {'trace s':>8s} {'target':>7s} {'peak GiB':>9s} {'phase':>15s} "
          f"{'events':>7s} {'RSS MiB':>8s}")
    ok = True
    for name in models:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, name], capture_output=True, text=True)
        total = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"{name:16s} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            ok = False
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        target = TARGET_S.get(name)
        ok &= target is None or total <= target
        print(f"{name:16s} {total:8.1f} {r['trace_s']:8.1f} {target or '-':>7} {r['peak_gib']:9.2f} "
              f"{r['peak_phase']:>15s} {r['events']:7d} {r['max_rss_mib']:8.0f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
