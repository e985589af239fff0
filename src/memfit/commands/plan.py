"""`memfit plan`: jobs like this one that fit the card, fastest first (memfit.plan)."""

from __future__ import annotations

import argparse
import json

TYPE_CHECKING = False  # (no typing import at run time: a cold start pays for it)
if TYPE_CHECKING:
    from typing import Any

GiB = 1 << 30


def add_parser(sub: Any) -> None:
    from ..cli import add_card_arguments, add_job_command, whole

    p = add_job_command(sub, "plan", run, help="what would make a job fit a card, ranked by estimated speed",
                        description="Search micro-batch x accumulation, checkpointing, precision, optimizer, method, "
                                    "strategy, offload, tensor parallelism and the allocator setting for jobs that "
                                    "fit.")
    add_card_arguments(p, "card memory, e.g. 24GiB (timed as an H100 unless --gpu names the card)")
    p.add_argument("--global-batch", type=whole(1), default=None, help="sequences per optimizer step to keep")
    p.add_argument("--global-batch-tokens", default=None, help="tokens per optimizer step to keep (e.g. 1M)")
    p.add_argument("--vary", default=None, help="levers that may move, comma-separated (also allows method changes)")
    p.add_argument("--keep", default=None, help="levers that must not move, comma-separated")
    p.add_argument("--top", type=whole(1), default=10, help="candidates to show")
    p.add_argument("--min-headroom", type=_percent, default=3.0,
                   help="percent of the card a candidate must leave free by the estimate (default 3)")
    p.add_argument("--max-seq-len", action="store_true", help="longest sequence that fits at this micro-batch")
    p.add_argument("--max-batch", action="store_true", help="largest micro-batch that fits, for this layout")
    p.add_argument("--min-gpus", action="store_true", help="fewest GPUs of this card that fit, and the layout")
    p.add_argument("--verify", type=whole(0), nargs="?", const=3, default=0, metavar="N",
                   help="check the first N listed candidates (default 3) with the capped trace of the real model "
                        "code, as `memfit estimate --max-batch-size --verify` does (single-GPU training; needs "
                        "memfit[trace]; 10-60 s each): each says whether the trace runs it too")
    p.add_argument("--json", action="store_true")


def _percent(text: str) -> float:
    """``--min-headroom``: a percent of the card, 0 to below 100."""
    from ..cli import finite

    v = finite(text)
    if not 0 <= v < 100:
        raise argparse.ArgumentTypeError(f"must be a percent of the card from 0 to below 100; got {text.strip()}")
    return v


_percent.__name__ = "float"


def _tokens(text: str) -> int:
    from ..errors import JobError

    t = str(text).strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        n = float("nan")
    if not 1 <= n < float("inf"):  # NaN, inf, 0 and negatives too
        raise JobError(f"--global-batch-tokens must be a number of tokens >= 1 like 1M or 524288; got {text!r}")
    return int(n)


_TRACE_MARK = {True: "  [trace: runs]", False: "  [trace: out of memory]", None: "  [trace: not checked]"}


def _verify(res: Any, mem: int, n: int) -> dict[int, bool | None]:
    """``--verify N``: the capped trace's verdict on each of the first ``n`` candidates at its micro-batch (None
    where the trace does not judge one: inference or a multi-GPU layout). The card is the plan's."""
    from ..tracer import trace

    out: dict[int, bool | None] = {}
    for i, c in enumerate(res.candidates[:n]):
        j = c.job
        if j.task != "train" or j.strategy != "single" or j.gpus > 1:
            out[i] = None
            continue
        out[i] = bool(trace(j, fallback=False, gpu_memory_bytes=mem).fits)
    return out


def run(args: argparse.Namespace) -> int:
    from ..cli import MAX_COUNT, card_from_args, job_from_args
    from ..errors import JobError
    from ..plan import max_batch, max_seq_len, min_gpus, plan

    job = job_from_args(args)
    mem = card_from_args(args)
    if mem is None:
        raise JobError("plan needs a card: --gpu NAME (see `memfit gpus`) or --gpu-memory 24GiB")
    if args.max_seq_len:
        n = max_seq_len(job, mem)
        print(json.dumps({"max_seq_len": n}) if args.json else f"longest sequence that fits: {n}")
        return 0
    if args.max_batch:
        n = max_batch(job, mem)
        print(json.dumps({"max_batch_size": n}) if args.json else f"largest micro-batch that fits: {n}")
        return 0
    if args.min_gpus:
        r = min_gpus(job, mem)
        if args.json:
            print(json.dumps({"min_gpus": r[0] if r else None, "job": r[1].to_dict() if r else None}))
        elif r:
            print(f"fewest GPUs: {r[0]} ({r[1].strategy}, {r[1].gpus_per_node} per node)")
        else:
            print("does not fit on up to 64 of these GPUs")
        return 0 if r else 1
    gb = args.global_batch
    if args.global_batch_tokens:
        gb = max(1, _tokens(args.global_batch_tokens) // job.seq_len)
        if gb > MAX_COUNT:
            raise JobError(f"--global-batch-tokens {args.global_batch_tokens} is more than {MAX_COUNT:,} sequences "
                           f"of {job.seq_len} tokens, the most a plan takes")
    if gb is not None and gb < 1:
        raise JobError("--global-batch must be >= 1")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    res = plan(job, args.gpu, gpu_memory_bytes=None if args.gpu else mem, global_batch=gb,
               vary=split(args.vary), keep=split(args.keep), top=args.top, min_headroom=args.min_headroom / 100)
    checked = _verify(res, mem, args.verify) if args.verify and res.any_fits else {}
    if args.json:
        out = res.to_dict()
        for i, ok in checked.items():
            out["candidates"][i]["verified_by_trace"] = ok
        print(json.dumps(out, indent=1))
        return 0
    head = f"{job.model} on {res.gpu or f'{mem / GiB:.2f} GiB'}: global batch {res.global_batch}"
    if not res.any_fits:
        print(f"{head}: nothing fits; closest:")
    else:
        print(f"{head}; {res.timed} candidates timed, best first (* changes the numerics)")
    print(f"{'#':>2} {'tokens/s':>9} {'step s':>7} {'device GiB':>10} {'headroom':>8}  changes  (cost)")
    for i, c in enumerate(res.candidates, 1):
        mark = "*" if c.numerics else " "
        check = _TRACE_MARK[checked[i - 1]] if (i - 1) in checked else ""
        print(f"{i:2d} {c.tokens_per_second:9.0f} {c.step_time_seconds:7.3f} {c.device_total_bytes / GiB:10.2f} "
              f"{c.headroom_bytes / GiB:8.2f} {mark}{'; '.join(c.changes) or 'as given'}  ({c.reason}){check}")
    if checked and not any(checked.values()):
        print("none of the checked candidates runs in the capped trace: try `memfit estimate --max-batch-size "
              "--verify` on a candidate's job, or --verify N with a larger N")
    if res.any_fits:
        from ..verdict import lora_ckpt_note

        notes = {lora_ckpt_note(c.job, "the fit answer a candidate's micro-batch rests on")
                 for c in res.candidates} - {None}
        for note in sorted(notes):
            print(note)
    return 0 if res.any_fits else 1
