#!/usr/bin/env python3
"""Why the fit answers of issue 9 miss where they miss: the evidence, printed from the records and the replays.

    PYTHONPATH=src python validation/fit_misses.py [--trace]

0. **First trials against later ones.** ``measure --find-max-batch`` runs its trials one after another in one
   process, emptying the cache between them; the replay describes a fresh process (the model loaded, then one
   run). Every trial of every record (default allocator setting) is replayed at the record's measured allocator
   limit and its verdict set against the measured one, the first trial of each search apart from the later ones.
1. **Address tie-breaks** (llama-3.1-8b prefill-2k, qwen2.5-1.5b decode-512, qwen3-1.7b generate-512). When a
   request has two or more cached free blocks of the same, smallest fitting size, ``get_free_block`` takes the
   one with the lowest address (``BlockComparatorSize``: size, then pointer). Which one that is depends on the
   addresses cudaMalloc handed the segments, which the allocator model cannot know: it gives new large segments
   decreasing addresses (:mod:`memfit.allocator.model`). Each record's trials are replayed (one call, at the
   record's measured allocator limit) twice: with the model as it is, and with new large segments at increasing
   addresses instead (``large_addresses="up"``, which the fit verdict of a training run also replays). Where the two disagree the verdict rests
   on the tie-break; the measured trial (its position in the search: trial 0 is the first in its process) says
   which order the driver gave that run.
2. **The parity of the decode-512 non-monotone stretch** (qwen2.5-1.5b, 16 GiB): the new segments the replay
   makes in the prefill's first layers at batches 229, 230 and 232, in units of one hidden-state tensor.
3. ``--trace``: **mistral-7b generate ran generate()'s padded path.** Its random prompt holds token 0 (the
   ``pad_token_id`` the measure engine passed) 5 times, so generate() inferred a padding mask: the trace of the
   job with transformers' mask skip forced off (padded) is set against the unpadded trace and the measured trials
   (peak allocated and reserved). Needs torch and transformers (about a minute on the CPU).

Reads validation/records/h200-boundaries*.json; writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "validation"))

from memfit.allocator import CachingAllocatorModel  # noqa: E402
from memfit.allocator.model import Block  # noqa: E402
from memfit.estimator import _spec, _stream  # noqa: E402
from memfit.estimator.events import replay  # noqa: E402
from memfit.job import Job  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
RECORDS = [REPO / "validation" / "records" / "h200-boundaries.json",
           REPO / "validation" / "records" / "h200-boundaries-2.json"]
TIES = {"llama-3.1-8b-prefill-2k": [14, 15, 16, 17], "qwen2.5-1.5b-decode-512": [229, 230, 231, 232, 233],
        "h2-qwen3-1.7b-generate-512": [126, 127, 128, 129]}


def records() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for p in RECORDS:
        for r in json.loads(p.read_text()):
            if r.get("kind") == "boundary":
                out[r["name"]] = r
    return out


def first_and_later(recs: dict[str, dict]) -> None:
    print("0. the replay's verdict at every measured trial (default allocator setting, the record's measured limit)")
    count = {True: [0, []], False: [0, []]}
    for name, rec in recs.items():
        fm = rec.get("find_max_batch") or {}
        job = Job.from_dict(rec["job"])
        if not fm.get("trials") or job.expandable_segments:
            continue
        spec = _spec(job, None)
        for k, t in enumerate(fm["trials"]):
            r = replay(_stream(spec, job.replace(batch_size=t["batch_size"]), fit=True)[0],
                       capacity_bytes=fm["card"]["allocator_limit_bytes"])
            count[k == 0][0] += 1
            if r.completed != t["ok"]:
                count[k == 0][1].append(f"{name} B={t['batch_size']} (trial {k})")
    for first, label in ((True, "first trials"), (False, "later trials")):
        n, off = count[first]
        print(f"  {label}: {n - len(off)} of {n} agree" + (f"; not: {', '.join(off)}" if off else ""))


def tie_breaks(recs: dict[str, dict]) -> None:
    print("1. address tie-breaks: one call replayed at the record's measured allocator limit")
    for name, batches in TIES.items():
        rec = recs[name]
        fm = rec["find_max_batch"]
        limit = fm["card"]["allocator_limit_bytes"]
        trials = {t["batch_size"]: (k, t) for k, t in enumerate(fm["trials"])}
        job = Job.from_dict(rec["job"])
        spec = _spec(job, None)
        print(f"  {name}: measured boundary {rec['max_batch_size']}, limit {limit / GiB:.3f} GiB")
        for b in batches:
            s = _stream(spec, job.replace(batch_size=b), fit=True)[0]
            down = replay(s, capacity_bytes=limit)
            up = CachingAllocatorModel(limit, on_oom="raise", large_addresses="up")
            up_ok = up.run(s.ops) < 0
            k, t = trials.get(b, (None, None))
            meas = (f"measured (trial {k}) {'fits' if t['ok'] else 'fails'} {t['peak_reserved_bytes'] / GiB:7.3f} GiB"
                    if t else "not measured")
            flag = "  <- verdict rests on the tie-break" if down.completed != up_ok else ""
            print(f"    B={b:4}  decreasing {'fits ' if down.completed else 'fails'} {down.peak_reserved_bytes / GiB:7.3f}"
                  f"  increasing {'fits ' if up_ok else 'fails'} {up.peak_reserved / GiB:7.3f}  {meas}{flag}")


def parity(recs: dict[str, dict]) -> None:
    rec = recs["qwen2.5-1.5b-decode-512"]
    job = Job.from_dict(rec["job"])
    spec = _spec(job, None)
    print("2. qwen2.5-1.5b decode-512: new segments of the prefill's first layers (x one hidden state, "
          "B x 512 x 1536 x 2 bytes), uncapped")
    for b in (229, 230, 232):
        s = _stream(spec, job.replace(batch_size=b), fit=True)[0]
        unit = b * job.prompt_len * spec.hidden_size * 2
        a = CachingAllocatorModel(None)
        blocks, phase, made, seen = {}, "", [], 0
        for op in s.ops:
            if op[0] == 0:
                r0 = a.reserved
                blocks[op[1]] = a.malloc(op[2])
                if phase == "prefill" and a.reserved > r0 and op[2] > 8 * MiB:
                    made.append(f"{op[2] / unit:.2f}")
                    seen += op[2] >= 5 * unit  # the MLP-wide ones: the first is layer 0's gate
            elif op[0] == 1:
                a.free(blocks.pop(op[1]))
            elif op[0] == 2:
                phase = op[1]
            if seen >= 4:
                break
        print(f"    B={b}: {' '.join(made)}")
    print("    (at 230 a 2.00 request - the fp32 copy in layer 0's post-attention norm - finds no block: the two freed halves "
          "of that size sit in different segments, while at 229 and 232 they are neighbours and merge)")
    from memfit.estimator import fits_on

    card = rec["gpu_memory_bytes"]
    marks = " ".join(f"{b}:{'Y' if fits_on(job.replace(batch_size=b), card) else 'n'}" for b in range(216, 236))
    print(f"    memfit's verdict on the {card / GiB:.0f} GiB card: {marks}")


@contextlib.contextmanager
def _padded():
    """transformers' sdpa mask skip turned off: the path generate() takes with an inferred padding mask."""
    from transformers import masking_utils as mu

    saved = {"_ignore_causal_mask_sdpa": mu._ignore_causal_mask_sdpa,
             "find_packed_sequence_indices": mu.find_packed_sequence_indices}
    mu._ignore_causal_mask_sdpa = lambda *a, **k: False
    mu.find_packed_sequence_indices = lambda *a, **k: None
    try:
        yield
    finally:
        for n, o in saved.items():
            setattr(mu, n, o)


def padded_generate(recs: dict[str, dict]) -> None:
    import torch

    from memfit.tracer import engine as eng
    from trace_fit import traced_stream

    rec = recs["mistral-7b-generate"]
    job = Job.from_dict(rec["job"])
    spec = _spec(job, None)
    fm = rec["find_max_batch"]
    limit = fm["card"]["allocator_limit_bytes"]
    trials = {t["batch_size"]: t for t in fm["trials"]}
    gen = torch.Generator().manual_seed(0)  # reference.make_batch's prompt
    ids = torch.randint(0, spec.vocab_size, (max(trials), job.prompt_len), generator=gen)
    print(f"3. mistral-7b generate: token 0 occurs {int((ids == 0).sum())} times in the measured prompts "
          f"(reference.make_batch, seed 0); traces with 4 new tokens (every verdict here is decided in the prefill)")
    unpadded = eng._unpadded_masks
    for b in (112, 124, 125):
        t = trials[b]
        out = []
        for label, ctx in (("unpadded", unpadded), ("padded", _padded)):
            eng._unpadded_masks = ctx
            try:
                s = traced_stream(job.replace(batch_size=b, new_tokens=4), 1)
            finally:
                eng._unpadded_masks = unpadded
            r = replay(s, capacity_bytes=limit)
            out.append(f"{label} {r.peak_allocated_bytes / GiB:7.3f} alloc {'fits ' if r.completed else 'fails'} "
                       f"{r.peak_reserved_bytes / GiB:7.3f}")
        print(f"    B={b}: trace {out[0]} | trace {out[1]} | measured {t['peak_allocated_bytes'] / GiB:7.3f} alloc "
              f"{'fits ' if t['ok'] else 'fails'} {t['peak_reserved_bytes'] / GiB:7.3f} GiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="store_true", help="also trace mistral-7b generate padded and unpadded")
    args = ap.parse_args(argv)
    recs = records()
    first_and_later(recs)
    tie_breaks(recs)
    parity(recs)
    if args.trace:
        padded_generate(recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
