#!/usr/bin/env python3
"""The estimate's event stream next to the capped trace's, tensor by tensor, for one boundary pair at one batch:
where the estimate's hand-written stream leaves the real model code's order. Runs on the CPU (the trace needs
``memfit[trace]``), about 10 s for an 8B-class model.

    python validation/probes/align_trace.py RECORD.json NAME BATCH [--phase forward] [--min-mib 100] [--rows 130]
        [--skip N]

Prints, row by row, ``+`` (malloc) or ``-`` (free), a per-side tensor number and the MiB, the estimate on the left
and the trace (with its aten op) on the right, from the first event of the phase (``--skip`` events of it
dropped), events below ``--min-mib`` left out; ``<<`` marks rows that differ in kind or size. Session 12 found the
RMSNorm order this way (OLMoE LoRA, checkpointed forward)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def estimate_events(job, spec, phase: str, min_bytes: int) -> list[tuple]:
    import memfit.estimator as est

    s = est._stream(spec, job, fit=True)[0]  # the stream a card's verdict replays
    sizes: dict = {}
    ids: dict = {}
    out = []
    on = False
    for o in s.ops:
        if o[0] == 2:
            if o[1] == phase and not on:
                on = True
            elif on and o[1] != phase:
                break
            continue
        if o[0] == 0:
            sizes[o[1]] = o[2]
            if on and o[2] >= min_bytes:
                out.append(("+", ids.setdefault(o[1], len(ids)), o[2], o[3]))
        elif o[0] == 1 and on and sizes.get(o[1], 0) >= min_bytes:
            out.append(("-", ids.get(o[1], "?"), sizes[o[1]], ""))
    return out


def trace_events(job, card: int, phase: str, min_bytes: int) -> list[tuple]:
    import memfit.tracer.tracker as tk
    from memfit.tracer import trace

    made = []
    init = tk.Tracker.__init__

    def keep(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    tk.Tracker.__init__ = keep
    try:
        trace(job, gpu_memory_bytes=card)
    finally:
        tk.Tracker.__init__ = init
    ev = []
    for r in made[-1].records:
        ev.append((r.born, "+", id(r), r.nbytes, r.op, r.phase))
        if r.died is not None:
            ev.append((r.died, "-", id(r), r.nbytes, r.op, r.phase))
    ev.sort(key=lambda x: x[0])
    ids: dict = {}
    out = []
    on = False
    for _, kind, key, n, op, ph in ev:
        # a free carries its tensor's birth phase, and a few births none of the run's phases (a workspace): the
        # phase is the latest birth's of the run's own phases
        if kind == "+" and ph in ("load", "forward", "backward", "optimizer_step"):
            if ph == phase:
                on = True
            elif on:
                break
        if on and n >= min_bytes:
            out.append((kind, ids.setdefault(key, len(ids)), n, op.replace("aten.", "")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("name")
    ap.add_argument("batch", type=int)
    ap.add_argument("--phase", default="forward")
    ap.add_argument("--min-mib", type=float, default=100.0)
    ap.add_argument("--rows", type=int, default=130)
    ap.add_argument("--skip", type=int, default=0)
    args = ap.parse_args(argv)
    from memfit.job import Job
    from memfit.models import load_model

    from memfit.errors import MemfitError

    try:
        recs = [r for r in json.loads(args.record.read_text()) if isinstance(r, dict) and r.get("name") == args.name]
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.record} as a boundary record list: {exc}", file=sys.stderr)
        return 2
    if not recs:
        print(f"error: no pair {args.name!r} in {args.record}", file=sys.stderr)
        return 2
    rec = recs[0]
    min_bytes = int(args.min_mib * 2**20)
    try:
        job = Job.from_dict(dict(rec["job"], batch_size=args.batch))
        est = estimate_events(job, load_model(job.model), args.phase, min_bytes)[args.skip:]
        tr = trace_events(job, int(rec["gpu_memory_bytes"]), args.phase, min_bytes)[args.skip:]
    except MemfitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mib = 2**20
    for i in range(min(args.rows, max(len(est), len(tr)))):
        a = est[i] if i < len(est) else None
        b = tr[i] if i < len(tr) else None
        left = f"{a[0]} {a[1]:>4} {a[2] / mib:8.0f} {a[3][:12]:12s}" if a else " " * 29
        right = f"{b[0]} {b[1]:>4} {b[2] / mib:8.0f} {b[3][:24]}" if b else ""
        same = a and b and a[0] == b[0] and round(a[2] / mib) == round(b[2] / mib)
        print(f"{i:4d}  {left} | {right}{'' if same else '   <<'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
