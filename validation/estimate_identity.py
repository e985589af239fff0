"""Every estimate figure over the measured records' jobs, dumped as JSON: run it before and after a change that
must not move any figure (a speed-up of the replay, say) and diff the two files.

For each job of validation/records/*.json:

- measured runs (records with a ``job``): ``estimate(job)`` and ``estimate(job, gpu_memory_bytes=card)`` for a
  16, 24 and 80 GiB card (the whole Breakdown: peak allocated, components, phases, peak reserved, device total,
  fits, headroom, notes, extras), ``fits_on`` for each card;
- boundary records (``kind: boundary``) and probes: the estimate on the record's card at every batch its search
  (and each probe) tried, and one and two past the largest, ``fits_on`` there, and ``max_batch_size`` on the card;
- plan scenarios: the start job and every candidate, estimated on the scenario's card, with ``fits_on``.

Errors (a job the estimator refuses) are dumped as their message. Prints the number of figures and the time.

    PYTHONPATH=src python validation/estimate_identity.py OUT.json [--quick] [--against BEFORE.json]

``--against`` compares with an earlier dump and lists the keys whose figures differ (exit status 1 if any).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from memfit.errors import MemfitError  # noqa: E402
from memfit.estimator import estimate, fits_on, max_batch_size  # noqa: E402
from memfit.job import Job  # noqa: E402

GiB = 1 << 30
CARDS = (16 * GiB, 24 * GiB, 80 * GiB)


def _call(fn, *a, **kw):
    try:
        out = fn(*a, **kw)
    except MemfitError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return out.to_dict() if hasattr(out, "to_dict") else out


def _items(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    return [s for s in data.get("scenarios", ()) if isinstance(s, dict)]


def cases(quick: bool = False):
    """(key, thunk) of every figure to dump."""
    for path in sorted((REPO / "validation" / "records").glob("*.json")):
        for n, rec in enumerate(_items(path)):
            tag = f"{path.name}#{n}:{rec.get('name') or rec.get('pair') or ''}"
            if "start_job" in rec:  # a plan scenario
                card = int(rec["gpu_memory_bytes"])
                jobs = [rec["start_job"]] + [c["job"] for c in rec.get("candidates", ()) if c.get("job")]
                for k, jd in enumerate(jobs[:2] if quick else jobs):
                    job = Job.from_dict(jd)
                    yield f"{tag}/job{k}/estimate@card", lambda j=job, c=card: _call(estimate, j, gpu_memory_bytes=c)
                    yield f"{tag}/job{k}/fits_on", lambda j=job, c=card: _call(fits_on, j, c)
                continue
            jd = rec.get("job") or ((rec.get("record") or {}).get("breakdown") or {}).get("job")
            if not jd:
                continue
            job = Job.from_dict(jd)
            kind = rec.get("kind")
            if kind in ("boundary", "probe"):
                card = int(rec.get("gpu_memory_bytes") or (rec.get("record") or {}).get("breakdown", {})
                           .get("gpu_memory_bytes") or 0)
                if not card:
                    continue
                tried = {int(t["batch_size"]) for t in (rec.get("find_max_batch") or {}).get("trials") or ()}
                if kind == "probe":
                    tried.add(int(rec["batch_size"]))
                if tried:
                    tried |= {max(tried) + 1, max(tried) + 2}
                for b in sorted(tried):
                    jb = job.replace(batch_size=b)
                    yield f"{tag}/b{b}/estimate@card", lambda j=jb, c=card: _call(estimate, j, gpu_memory_bytes=c)
                    yield f"{tag}/b{b}/fits_on", lambda j=jb, c=card: _call(fits_on, j, c)
                if kind == "boundary":
                    yield f"{tag}/max_batch_size", lambda j=job, c=card: _call(max_batch_size, j, c)
                continue
            yield f"{tag}/estimate", lambda j=job: _call(estimate, j)
            for card in CARDS[-1:] if quick else CARDS:
                yield f"{tag}/estimate@{card // GiB}", lambda j=job, c=card: _call(estimate, j, gpu_memory_bytes=c)
                yield f"{tag}/fits_on@{card // GiB}", lambda j=job, c=card: _call(fits_on, j, c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="fewer cards and plan candidates")
    ap.add_argument("--against", type=Path, help="an earlier dump to compare with")
    args = ap.parse_args()
    out_path = args.out.resolve()
    before = json.loads(args.against.read_text()) if args.against else None
    os.chdir(REPO)  # some records name their model by a path inside the repository (validation/configs/...)
    t = time.perf_counter()
    out = {}
    for key, thunk in cases(args.quick):
        if key in out:
            raise SystemExit(f"duplicate key {key}")
        out[key] = thunk()
    text = json.dumps(out, indent=0, sort_keys=False)
    out_path.write_text(text)
    out = json.loads(text)  # compared as written (tuples are lists there)
    errors = sum(isinstance(v, dict) and "error" in v for v in out.values())
    print(f"{len(out)} figures ({errors} errors) in {time.perf_counter() - t:.1f} s -> {out_path}")
    if before is not None:
        keys = list(dict.fromkeys([*before, *out]))
        differ = [k for k in keys if before.get(k) != out.get(k)]
        for k in differ[:20]:
            print(f"differs: {k}")
        print(f"against {args.against}: {len(keys)} keys, {len(differ)} differ")
        if differ:
            sys.exit(1)


if __name__ == "__main__":
    main()
