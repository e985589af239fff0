"""`memfit estimate`: the analytical estimate as a table, JSON, or the largest batch that fits."""

from __future__ import annotations

import argparse

from ..cli import add_job_arguments, job_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("estimate", help="estimate GPU memory of a job (no GPU, no torch)",
                       description="Estimate the per-GPU memory of a training or inference job.")
    add_job_arguments(p)
    p.add_argument("--deepspeed", metavar="FILE", help="read ZeRO stage, bf16/fp16, offload, bucket sizes and "
                   "micro-batch from a DeepSpeed ds_config.json (flags override it)")
    p.add_argument("--accelerate-config", metavar="FILE", dest="accelerate_config",
                   help="read the engine, precision and GPUs from an Accelerate config (FSDP, DeepSpeed, DDP)")
    p.add_argument("--json", action="store_true", help="print the Breakdown as JSON")
    p.add_argument("--max-batch-size", action="store_true", help="find the largest micro-batch that fits")
    p.add_argument("--gpu-memory", default="80GiB", help="device memory for --max-batch-size (default 80GiB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..estimator import estimate, max_batch_size
    from ..units import parse_bytes

    job = job_from_args(args)
    if args.max_batch_size:
        cap = parse_bytes(args.gpu_memory)
        n = max_batch_size(job, cap)
        if args.json:
            import json

            print(json.dumps({"max_batch_size": n, "gpu_memory_bytes": cap, "job": job.to_dict()}))
        elif n == 0:
            print(f"does not fit: even batch 1 needs more than {cap / 2**30:.1f} GiB")
        else:
            bd = estimate(job.replace(batch_size=n))
            print(f"largest micro-batch that fits in {cap / 2**30:.1f} GiB: {n} "
                  f"(device total {bd.device_total_bytes / 2**30:.2f} GiB)")
        return 0 if n else 1
    bd = estimate(job)
    if args.json:
        print(bd.to_json(indent=1))
        return 0
    from ..render import print_breakdown

    print_breakdown(bd)
    return 0
