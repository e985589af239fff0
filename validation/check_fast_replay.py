"""The fast replay gives today's answers: every result of the fast path against the full, event-by-event replay.

The full replay is :mod:`memfit.estimator.events` with ``_FULL_REPLAY`` on (what ``MEMFIT_FULL_REPLAY=1``
sets): every replay walks the stream through ``CachingAllocatorModel.malloc``/``free`` one event at a time,
``account`` walks it one event at a time, no replay is skipped or reused. ``max_batch_size``'s reference is
the doubling-then-bisecting loop it had before the shared search (copied below), over full-replay ``fits_on``.

Compared, for each job of the grid (registry models x train full/LoRA/QLoRA x checkpointing x batch, infer
prefill and ``generate()`` incl. sliding-window and MoE models, both allocator settings):

- ``estimate(job)`` and ``estimate(job, gpu_memory_bytes=card)`` for cards of 16/24/40/80 GiB: the whole
  Breakdown (peak allocated, components and their order, phases, peak reserved, device total, fits, headroom,
  notes with the failed request and phase, extras);
- ``replay(stream, capacity_bytes=...)`` field by field at caps around the run's own peak reserve (just
  under, at, just over) and the cards' caps;
- ``fits_on`` for each card, and ``max_batch_size`` on several cards (a subset: it is the slow part);
- multi-GPU jobs (DDP, FSDP2, ZeRO-2 with offload, ZeRO-3, tensor and pipeline parallel): their estimates and
  ``fits_on`` (every rank's stream, accounted and replayed).

Prints the number of cases and of mismatches (must be 0), and the time of both paths.
``--quick`` runs a smaller grid; ``--dump FILE`` writes every fast-path answer as JSON (to compare two
checkouts: run it in each and diff the files).

    PYTHONPATH=src python validation/check_fast_replay.py [--quick] [--dump answers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.errors import MemfitError  # noqa: E402
from memfit.estimator import _stream, estimate, fits_on, max_batch_size  # noqa: E402
from memfit.estimator import events  # noqa: E402
from memfit.models import load_model  # noqa: E402

GiB = 1 << 30
CARDS = (16 * GiB, 24 * GiB, 40 * GiB, 80 * GiB)

TRAIN_MODELS = ("llama-3.2-1b", "qwen2.5-0.5b", "gemma-3-1b", "qwen3-0.6b", "olmoe-1b-7b", "gpt2", "pythia-160m",
                "bert-base-uncased", "llama-3.1-8b", "mistral-7b-v0.1", "qwen3-30b-a3b", "gemma-2-2b", "phi-3-mini",
                "granite-3.1-1b-a400m", "opt-125m", "deepseek-v2-lite")
INFER_MODELS = ("llama-3.2-1b", "gemma-3-1b", "mistral-7b-v0.1", "gemma-2-2b", "qwen3-30b-a3b", "olmoe-1b-7b",
                "qwen2.5-0.5b", "gpt2", "llama-3.1-8b", "gpt-oss-20b")
QUICK_TRAIN = ("llama-3.2-1b", "gemma-3-1b", "olmoe-1b-7b", "gpt2", "llama-3.1-8b")
QUICK_INFER = ("llama-3.2-1b", "gemma-3-1b", "mistral-7b-v0.1", "olmoe-1b-7b")


def reference_max_batch_size(job: Job, gpu_memory_bytes: int, *, limit: int = 1 << 16, spec=None) -> int:
    """``max_batch_size`` as it was before the shared search (the loop of memfit.estimator, commit d773d5b)."""
    def fits(b: int) -> bool:
        return fits_on(job.replace(batch_size=b), gpu_memory_bytes, spec)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def jobs(quick: bool):
    tm, im = (QUICK_TRAIN, QUICK_INFER) if quick else (TRAIN_MODELS, INFER_MODELS)
    batches = (1, 4) if quick else (1, 3, 8)
    for model in tm:
        for method, precision in (("full", "bf16-mixed"), ("full", "bf16-true"), ("lora", "bf16-mixed"),
                                  ("qlora", "bf16-mixed")):
            for ckpt in (False, True):
                for b in batches:
                    yield dict(model=model, method=method, precision=precision, gradient_checkpointing=ckpt,
                               batch_size=b, seq_len=1024)
    for model in im:
        for new in (0, 48):
            for b in batches:
                yield dict(model=model, task="infer", precision="bf16-true", prompt_len=1024, new_tokens=new,
                           batch_size=b)
    # sliding-window prompts longer than the window (gemma-3's 512, mistral v0.1's 4096)
    for model, p in (("gemma-3-1b", 2048), ("mistral-7b-v0.1", 4608), ("gemma-2-2b", 4608)):
        yield dict(model=model, task="infer", precision="bf16-true", prompt_len=p, new_tokens=24, batch_size=2)
    # multi-GPU: each rank's stream is built through the same Stream (its side lists feed the fast account)
    # and replayed under the card's cap by fits_parallel
    par_models = ("llama-3.2-1b", "olmoe-1b-7b") if quick else ("llama-3.2-1b", "olmoe-1b-7b", "qwen2.5-0.5b",
                                                                  "gemma-3-1b")
    for model in par_models:
        for par in (dict(strategy="ddp", gpus=2), dict(strategy="fsdp2", gpus=4), dict(strategy="zero3", gpus=8),
                    dict(strategy="zero2", gpus=2, offload="optimizer"), dict(gpus=8, tensor_parallel=8),
                    dict(gpus=4, pipeline_parallel=2, tensor_parallel=2)):
            for ckpt in (False, True):
                yield dict(model=model, precision="bf16-mixed", gradient_checkpointing=ckpt, batch_size=2,
                           seq_len=1024, **par)


def answers(job: Job, spec, mbs_cards: tuple[int, ...]) -> dict:
    """Every answer the fast path (or the full one) gives for ``job``."""
    out: dict = {}

    def call(key, f):
        try:
            out[key] = f()
        except MemfitError as exc:  # an invalid combination: the error must be the same too
            out[key] = f"error: {exc}"

    call("estimate", lambda: estimate(job, spec).to_dict())
    for card in CARDS:
        call(f"estimate@{card // GiB}", lambda: estimate(job, spec, gpu_memory_bytes=card).to_dict())
        call(f"fits_on@{card // GiB}", lambda: fits_on(job, card, spec))
    try:
        stream = _stream(spec, job)[0]
    except MemfitError:
        stream = None
    if stream is not None and job.strategy == "single":
        exp = bool(job.expandable_segments)
        free = events.replay(stream, expandable_segments=exp)
        peak = free.peak_reserved_bytes
        caps = sorted({max(0, peak - 1), peak, peak + 1, max(0, peak - (64 << 20)), max(0, peak // 2),
                       *(c - events.cuda_context_bytes(job.task) for c in CARDS)})
        for cap in caps:
            r = events.replay(stream, capacity_bytes=cap, expandable_segments=exp,
                              uncapped=None if events._FULL_REPLAY else free)
            out[f"replay@{cap}"] = asdict(r)
        out["account"] = asdict(events.account(stream))
    for card in mbs_cards:
        if events._FULL_REPLAY:
            call(f"max_batch_size@{card // GiB}", lambda: reference_max_batch_size(job, card, spec=spec))
        else:
            call(f"max_batch_size@{card // GiB}", lambda: max_batch_size(job, card, spec=spec))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--dump", metavar="FILE", help="write the fast path's answers as JSON")
    args = ap.parse_args()
    cases = mismatches = 0
    t_fast = t_full = 0.0
    dump: dict = {}
    specs: dict = {}
    for i, kw in enumerate(jobs(args.quick)):
        for exp in (False, True):
            try:
                job = Job(**kw, expandable_segments=exp)
            except MemfitError:
                continue
            spec = specs.setdefault(job.model, load_model(job.model))
            # max_batch_size on a subset of the grid (every 4th job, batch 1 ones), on 16 and 80 GiB (24 GiB too
            # for inference)
            mbs = ((16 * GiB, 80 * GiB) + ((24 * GiB,) if job.task == "infer" else ())
                   if kw["batch_size"] == 1 and i % 4 == 0 else ())
            events._FULL_REPLAY = True
            t = time.perf_counter()
            ref = answers(job, spec, mbs)
            t_full += time.perf_counter() - t
            events._FULL_REPLAY = False
            t = time.perf_counter()
            got = answers(job, spec, mbs)
            t_fast += time.perf_counter() - t
            key = json.dumps(job.to_dict(), sort_keys=True)
            dump[key] = got
            for k in ref:
                cases += 1
                same = ref[k] == got.get(k) and json.dumps(ref[k]) == json.dumps(got.get(k))  # order too
                if not same:
                    mismatches += 1
                    print(f"MISMATCH {k} {kw} expandable={exp}\n  full: {ref[k]}\n  fast: {got.get(k)}")
    print(f"{cases} cases, {mismatches} mismatches (full replay {t_full:.1f} s, fast path {t_fast:.1f} s)")
    if args.dump:
        Path(args.dump).write_text(json.dumps(dump, indent=0, sort_keys=True))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
