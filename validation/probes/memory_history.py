#!/usr/bin/env python3
"""One measured run with PyTorch's allocator history on: every cudaMalloc/cudaFree and block alloc/free of
1 MiB or more, with the Python frames that asked, written compactly, for the fit misses' diagnosis.

    python validation/probes/memory_history.py NAME 'JOB-JSON' BATCH OUT.json.gz [--limit-bytes N] [--steps N]

``--limit-bytes`` caps the allocator at exactly that many bytes (``set_per_process_memory_fraction(limit /
total)``: the limit a boundary record measured, so the run meets the same wall), else it runs uncapped.
The history is ``torch.cuda.memory._record_memory_history(stacks="python")``'s device trace
(``torch/cuda/memory.py``, torch 2.11): actions ``alloc``, ``free_requested``, ``free_completed``,
``segment_alloc``, ``segment_free``, ``oom``. Written: ``{"name", "job", "batch", "limit_bytes", "env",
"breakdown", "frames": [...], "events": [[action, addr, size, frame_index], ...]}`` where the frame is the
innermost frame in transformers / peft / bitsandbytes / memfit / torch.nn / torch.autograd code (file:line
function), events below 1 MiB left out except segment and oom actions.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

KEEP = ("transformers/", "peft/", "bitsandbytes/", "memfit/", "torch/nn/", "torch/autograd/",
        "torch/utils/checkpoint", "torch/_tensor")


def _frame(frames: list[dict]) -> str:
    for f in frames or []:
        name = f.get("filename", "")
        if any(k in name for k in KEEP):
            short = name.split("site-packages/")[-1].split("/src/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return (f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?")


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("job")
    ap.add_argument("batch", type=int)
    ap.add_argument("out")
    ap.add_argument("--limit-bytes", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    import torch

    from memfit.job import Job
    from memfit.measurer import measure

    job = dict(json.loads(a.job))
    job["batch_size"] = a.batch
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.init()
    total = torch.cuda.get_device_properties(dev).total_memory
    if a.limit_bytes:
        torch.cuda.set_per_process_memory_fraction(a.limit_bytes / total, dev)
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                             max_entries=3_000_000)
    bd = measure(Job.from_dict(job), steps=a.steps, progress=False)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    frames: list[str] = []
    index: dict[str, int] = {}
    events = []
    for ev in (snap.get("device_traces") or [[]])[0]:
        act = ev.get("action")
        size = int(ev.get("size") or 0)
        if size < 2**20 and act not in ("segment_alloc", "segment_free", "oom", "segment_map", "segment_unmap"):
            continue
        fr = _frame(ev.get("frames") or [])
        if fr not in index:
            index[fr] = len(frames)
            frames.append(fr)
        events.append([act, int(ev.get("addr") or 0), size, index[fr]])
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev)}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    rec = {"name": a.name, "job": job, "batch": a.batch, "limit_bytes": a.limit_bytes, "env": env,
           "breakdown": bd.to_dict(), "frames": frames, "events": events}
    with gzip.open(a.out, "wt") as fh:
        json.dump(rec, fh)
    ex = bd.extras or {}
    print(f"{a.name} B={a.batch} fits={ex.get('fits', True)} alloc {bd.peak_allocated_bytes / 2**30:.3f} "
          f"reserved {bd.peak_reserved_bytes / 2**30:.3f} events {len(events)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
