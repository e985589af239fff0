"""`memfit estimate`: the analytical estimate as a table, JSON, the fit verdict on a card, or the largest
batch that fits."""

from __future__ import annotations

import argparse
import inspect
import json

from ..cli import add_card_arguments, add_job_command, card_from_args, job_from_args

GiB = 1 << 30


def add_parser(sub) -> None:
    p = add_job_command(sub, "estimate", run, help="estimate GPU memory of a job (no GPU, no torch)",
                        description="Estimate the per-GPU memory of a training or inference job. With --gpu or "
                                    "--gpu-memory it says whether the job FITS that card.")
    p.add_argument("--deepspeed", metavar="FILE", help="read ZeRO stage, bf16/fp16, offload, bucket sizes and "
                   "micro-batch from a DeepSpeed ds_config.json (flags override it)")
    p.add_argument("--accelerate-config", metavar="FILE", dest="accelerate_config",
                   help="read the engine, precision and GPUs from an Accelerate config (FSDP, DeepSpeed, DDP)")
    p.add_argument("--json", action="store_true", help="print the Breakdown as JSON")
    p.add_argument("--max-batch-size", action="store_true",
                   help="find the largest micro-batch that fits the card (default card: 80GiB)")
    p.add_argument("--verify", action="store_true",
                   help="with --max-batch-size, training jobs: check the answer with the trace (the real model "
                        "code on fake tensors, capped at the card; needs pip install 'memfit[trace]', 10-60 s)")
    add_card_arguments(p, "the card's memory, with its unit (24GiB or 24GB): say whether the job fits it")
    p.add_argument("--plot", metavar="FILE", help="draw the breakdown and the phases to FILE (.png or .svg; "
                   "needs matplotlib)")


def _estimate(job, card, spec=None):
    """The estimate, judged on ``card`` by the engine itself where it takes the card."""
    from ..estimator import estimate

    if card is not None and "gpu_memory_bytes" in inspect.signature(estimate).parameters:
        return estimate(job, spec, gpu_memory_bytes=card)
    return estimate(job, spec)


def estimate_with_verdict(job, card: int | None, spec=None):
    """``(Breakdown, verdict or None)``: the Breakdown ``memfit estimate --json`` prints (with ``fits``,
    ``gpu_memory_bytes`` and ``headroom_bytes`` filled from the verdict when a card is given). The web API
    answers with this same function."""
    from ..verdict import verdict

    bd = _estimate(job, card, spec)
    v = None
    if card is not None:
        v = verdict(bd, card)
        bd.fits, bd.gpu_memory_bytes, bd.headroom_bytes = v["fits"], v["gpu_memory_bytes"], v["headroom_bytes"]
    return bd, v


def fit_line(v: dict) -> str:
    """One line: FITS / DOES NOT FIT, the headroom and the largest component."""
    word = "FITS" if v["fits"] else "DOES NOT FIT"
    room = v["headroom_bytes"]
    room_txt = f"headroom {room / GiB:.2f} GiB" if room >= 0 else f"{-room / GiB:.2f} GiB too big"
    comp = (f"; largest component {v['deciding_component']} {v['deciding_bytes'] / GiB:.2f} GiB"
            if v["deciding_component"] else "")
    return f"{word} on a {v['gpu_memory_bytes'] / GiB:.2f} GiB card: {room_txt}{comp}"


def _verified(job, cap: int, as_json: bool) -> int:
    """``--max-batch-size --verify``: the estimate's answer checked (and corrected) by the capped trace."""
    from ..tracer.verify import verified_max_batch_size

    v = verified_max_batch_size(job, cap)
    n = v["max_batch_size"]
    if as_json:
        print(json.dumps({"max_batch_size": n, "gpu_memory_bytes": cap, "verified_by": "trace",
                          "estimate_max_batch_size": v["estimate_max_batch_size"],
                          "trials": [{"batch_size": b, "fits": ok} for b, ok in v["trials"]],
                          "first_oom": v["first_oom"], "job": job.to_dict()}))
        return 0 if n else 1
    tried = ", ".join(f"{b} {'runs' if ok else 'OOM'}" for b, ok in v["trials"])
    if v["estimate_max_batch_size"] == 0:
        print(f"does not fit: even batch 1 needs more than {cap / GiB:.2f} GiB (the estimate; nothing to trace)")
    elif n == 0:
        print(f"does not fit: the trace runs out of memory at batch 1 on {cap / GiB:.2f} GiB (traced: {tried})")
    else:
        est = v["estimate_max_batch_size"]
        same = "the estimate's answer" if est == n else f"the estimate said {est}"
        print(f"largest micro-batch that fits in {cap / GiB:.2f} GiB: {n} (checked by the trace: {tried}; {same})")
    return 0 if n else 1


def run(args: argparse.Namespace) -> int:
    from ..estimator import max_batch_size
    from ..verdict import lora_ckpt_note

    job = job_from_args(args)
    card = card_from_args(args)
    if getattr(args, "verify", False) and not args.max_batch_size:
        from ..errors import JobError

        raise JobError("--verify checks the --max-batch-size answer: add --max-batch-size (and a card)")
    if args.max_batch_size:
        cap = card if card is not None else 80 * GiB
        if getattr(args, "verify", False):
            return _verified(job, cap, args.json)
        n = max_batch_size(job, cap)
        if args.json:
            print(json.dumps({"max_batch_size": n, "gpu_memory_bytes": cap, "job": job.to_dict()}))
        elif n == 0:
            print(f"does not fit: even batch 1 needs more than {cap / GiB:.2f} GiB")
        else:
            bd = _estimate(job.replace(batch_size=n), cap)
            print(f"largest micro-batch that fits in {cap / GiB:.2f} GiB: {n} "
                  f"(device total {bd.device_total_bytes / GiB:.2f} GiB)")
            note = lora_ckpt_note(job)
            if note:
                print(note)
        return 0 if n else 1
    bd, v = estimate_with_verdict(job, card)
    if getattr(args, "plot", None):
        from ..charts import plot_breakdown
        import sys

        print(f"breakdown drawn to {plot_breakdown(bd, args.plot)}", file=sys.stderr)
    if args.json:
        print(bd.to_json(indent=1))
        return 0 if v is None or v["fits"] else 1
    from ..render import print_breakdown

    print_breakdown(bd)
    from rich.console import Console

    from ..charts import stacked_bar

    con = Console()
    con.print(stacked_bar(bd, line=con.width - 1))
    if v is not None:
        print(fit_line(v))
        return 0 if v["fits"] else 1
    return 0
