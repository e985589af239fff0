#!/usr/bin/env python3
"""Replay the trace engine's op-level allocation stream of a boundary record's job under the record's cap.

    python validation/trace_fit.py NAME BATCH[,BATCH...] [--new-tokens N] [--steps 1] [--estimate]

NAME is a record of validation/records/h200-boundaries.json. For each batch the job is traced on fake tensors
(``memfit trace``), its allocations and frees are rebuilt in order as a :class:`memfit.estimator.events.Stream`
and replayed through the allocator model at the record's allocator limit (card less the measured CUDA
context). ``--steps`` defaults to what a ``measure --find-max-batch`` trial runs (two training steps, one inference
call); QLoRA (nf4/fp4) jobs trace with bitsandbytes' 4-bit linears emulated; ``--new-tokens`` trims a long
decode (every boundary of these records is decided in the prefill). ``--estimate`` prints the estimate's own
one-call stream replayed the same way, for comparison. The record's trials are printed first.

This is how the op-by-op prefill stream of the estimate was checked (issue 9): the trace's stream reproduces
the measured verdicts and reserves, and the estimate's stream was made to follow it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from memfit.estimator import _spec, _stream  # noqa: E402
from memfit.estimator.events import Stream, replay  # noqa: E402
from memfit.job import Job  # noqa: E402


def traced_stream(job: Job, steps: int) -> Stream:
    """The trace's allocations and frees of ``job`` as a Stream (a reset where the measured window starts)."""
    from memfit.tracer import trace
    from memfit.tracer import tracker as trk

    kept: dict = {}
    close = trk.Tracker.close

    def keep(self):  # the records stay readable after the trace closes its tracker
        kept["t"] = self
        close(self)

    trk.Tracker.close = keep
    try:
        trace(job, fallback=False, steps=steps)
    finally:
        trk.Tracker.close = close
    t = kept["t"]
    events = []
    for i, r in enumerate(t.records):
        events.append((r.born, 0, i))
        if r.died is not None:
            events.append((r.died, 1, i))
    events.sort()
    s, handles, phase, reset = Stream(), {}, None, False
    for event, kind, i in events:
        r = t.records[i]
        if not reset and event > t.window_start_event:
            s.reset_peaks()
            reset = True
        if kind == 0:
            if r.phase != phase:
                s.phase(r.phase)
                phase = r.phase
            handles[i] = s.alloc(max(r.nbytes, 1), r.category)
        else:
            s.free(handles.pop(i))
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("batches")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help="steps traced; default as measure --find-max-batch runs a trial: 2 for training, 1 call for "
                         "inference")
    ap.add_argument("--estimate", action="store_true")
    ap.add_argument("--records", type=Path, default=REPO / "validation" / "records" / "h200-boundaries.json")
    args = ap.parse_args(argv)
    rec = next(r for r in json.loads(args.records.read_text()) if r.get("name") == args.name)
    fm = rec["find_max_batch"]
    limit = fm["card"]["allocator_limit_bytes"]
    job = Job.from_dict(rec["job"])
    if args.steps is None:
        args.steps = 2 if job.task == "train" else 1
    if args.new_tokens is not None:
        job = job.replace(new_tokens=min(job.new_tokens, args.new_tokens))
    print(f"{args.name}: measured boundary {rec['max_batch_size']}, allocator limit {limit / 2**30:.3f} GiB")
    for tr in sorted(fm["trials"], key=lambda x: x["batch_size"]):
        print(f"  measured B={tr['batch_size']:5} ok={tr['ok']!s:5} reserved {tr['peak_reserved_bytes'] / 2**30:7.3f} GiB"
              f" request {(tr.get('oom_request_bytes') or 0) / 2**20:9.1f} MiB")
    spec = _spec(job, None) if args.estimate else None
    for b in (int(x) for x in args.batches.split(",")):
        streams = [("trace", traced_stream(job.replace(batch_size=b), args.steps))]
        if args.estimate:
            streams.append(("estimate", _stream(spec, job.replace(batch_size=b), fit=True)[0]))
        for label, s in streams:
            r = replay(s, capacity_bytes=limit, expandable_segments=job.expandable_segments)
            print(f"  {label:8} B={b:5} ok={r.completed!s:5} reserved {r.peak_reserved_bytes / 2**30:7.3f} GiB"
                  f" request {r.failed_request_bytes / 2**20:9.1f} MiB {r.failed_phase}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
