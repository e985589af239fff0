"""Consistency figures for the multi-GPU estimate (no measured multi-GPU records exist yet).

For a grid of multi-GPU jobs: peak allocated, peak reserved and what the replay says about a card;
and DDP minus its buckets against the single-GPU estimate of the same job (allocated must match exactly).
Run: PYTHONPATH=src python validation/rank_consistency.py [--json out.json]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from memfit import Job  # noqa: E402
from memfit.estimator import estimate, max_batch_size  # noqa: E402
from memfit.models import load_model  # noqa: E402

GiB = 2**30

GRID = [
    ("llama-3.1-8b", dict(strategy="ddp", gpus=8, precision="bf16-true")),
    ("llama-3.1-8b", dict(strategy="ddp", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="fsdp2", gpus=8, precision="bf16-mixed")),
    ("llama-3.1-8b", dict(strategy="fsdp2", gpus=8, precision="bf16-mixed", reshard_after_forward=False)),
    ("llama-3.1-8b", dict(strategy="fsdp", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="fsdp", gpus=8, precision="bf16-mixed", fsdp_sharding="SHARD_GRAD_OP")),
    ("llama-3.1-8b", dict(strategy="fsdp2", gpus=8, precision="bf16-mixed", offload="optimizer+params")),
    ("llama-3.1-8b", dict(strategy="zero1", gpus=8, precision="bf16-mixed")),
    ("llama-3.1-8b", dict(strategy="zero2", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="zero2", gpus=8, precision="bf16-mixed", offload="optimizer")),
    ("llama-3.1-8b", dict(strategy="zero3", gpus=8, precision="bf16-mixed")),
    ("llama-3.1-8b", dict(strategy="zero3", gpus=8, precision="bf16-mixed", offload="optimizer+params",
                          gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="zero1", gpus=8, precision="bf16-mixed", tensor_parallel=4)),
    ("llama-3.1-8b", dict(strategy="zero1", gpus=8, precision="bf16-mixed", tensor_parallel=2,
                          sequence_parallel=True, pipeline_parallel=2, gradient_checkpointing=True)),
    ("qwen2.5-7b", dict(strategy="ddp", gpus=4, method="lora", precision="bf16-mixed", gradient_checkpointing=True)),
    ("qwen2.5-7b", dict(strategy="fsdp2", gpus=4, method="lora", precision="bf16-mixed")),
    ("llama-3.2-1b", dict(strategy="zero3", gpus=4, precision="bf16-mixed", batch_size=4)),
    ("llama-3.1-70b", dict(strategy="zero1", gpus=64, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=8,
                           sequence_parallel=True, seq_len=4096, gradient_checkpointing=True)),
    ("mixtral-8x7b", dict(strategy="zero1", gpus=8, precision="bf16-mixed", seq_len=256, expert_parallel=8)),
]

DDP_CASES = [
    ("llama-3.2-1b", dict(precision="bf16-true")),
    ("llama-3.2-1b", dict(precision="bf16-mixed", gradient_checkpointing=True)),
    ("qwen3-4b", dict(method="lora", precision="bf16-true", batch_size=4)),
    ("gpt2", dict(precision="32-true")),
    ("gemma-3-1b", dict(precision="bf16-mixed", batch_size=4)),
    ("llama-3.1-8b", dict(precision="bf16-true", seq_len=256)),
    ("qwen2.5-7b", dict(method="lora", precision="bf16-mixed", gradient_checkpointing=True, seq_len=2048)),
    ("llama-3.2-1b", dict(method="qlora", quantization="nf4", precision="bf16-mixed", gradient_checkpointing=True)),
    ("bert-base-uncased", dict(precision="bf16-mixed", task="train")),
]


def _job(model: str, kw: dict) -> Job:
    d = {"model": model, "batch_size": 1, "seq_len": 1024}
    d.update(kw)
    return Job.from_dict(d)


def main() -> dict:
    out = {"grid": [], "ddp": []}
    print(f"{'job':70s} {'alloc GiB':>9s} {'resv GiB':>9s} {'resv/alloc':>10s}")
    for model, kw in GRID:
        job = _job(model, kw)
        bd = estimate(job)
        name = model + " " + " ".join(f"{k}={v}" for k, v in kw.items())
        row = {"job": name, "peak_allocated_bytes": bd.peak_allocated_bytes,
               "peak_reserved_bytes": bd.peak_reserved_bytes, "device_total_bytes": bd.device_total_bytes}
        out["grid"].append(row)
        print(f"{name[:70]:70s} {bd.peak_allocated_bytes / GiB:9.3f} {bd.peak_reserved_bytes / GiB:9.3f} "
              f"{bd.peak_reserved_bytes / bd.peak_allocated_bytes:10.4f}")
    print()
    print(f"{'DDP (2 GPUs) minus buckets vs single':60s} {'single':>9s} {'ddp-bk':>9s} {'diff B':>8s} "
          f"{'resv 1':>8s} {'resv ddp':>8s} {'bk GiB':>7s}")
    for model, kw in DDP_CASES:
        job = _job(model, kw)
        try:
            single = estimate(job)
            ddp = estimate(job.replace(gpus=2, strategy="ddp"))
        except Exception as exc:  # noqa: BLE001 - a job one side cannot estimate is reported, not fatal
            print(f"{model} {kw}: {type(exc).__name__}: {exc}")
            continue
        bk = ddp.components.get("communication_buffers", 0)
        diff = ddp.peak_allocated_bytes - bk - single.peak_allocated_bytes
        name = model + " " + " ".join(f"{k}={v}" for k, v in kw.items())
        out["ddp"].append({"job": name, "single_allocated": single.peak_allocated_bytes,
                           "ddp_minus_buckets": ddp.peak_allocated_bytes - bk,
                           "single_reserved": single.peak_reserved_bytes, "ddp_reserved": ddp.peak_reserved_bytes,
                           "buckets": bk})
        print(f"{name[:60]:60s} {single.peak_allocated_bytes / GiB:9.3f} {(ddp.peak_allocated_bytes - bk) / GiB:9.3f} "
              f"{diff:8d} {single.peak_reserved_bytes / GiB:8.3f} {ddp.peak_reserved_bytes / GiB:8.3f} {bk / GiB:7.3f}")
    print()
    print(f"{'largest micro-batch (seq 2048) on a card':70s} {'24 GiB':>7s} {'40 GiB':>7s} {'80 GiB':>7s}")
    out["max_batch"] = []
    for model, kw in FIT:
        job = _job(model, {"seq_len": 2048, **kw})
        spec = load_model(model)
        ns = [max_batch_size(job, gib << 30, spec=spec, limit=256) for gib in (24, 40, 80)]
        name = model + " " + " ".join(f"{k}={v}" for k, v in kw.items())
        out["max_batch"].append({"job": name, "max_batch_size": ns})
        print(f"{name[:70]:70s} {ns[0]:7d} {ns[1]:7d} {ns[2]:7d}")
    return out


FIT = [
    ("llama-3.2-1b", dict(strategy="ddp", gpus=4, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.2-3b", dict(strategy="fsdp2", gpus=8, precision="bf16-mixed")),
    ("llama-3.2-3b", dict(strategy="fsdp", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="fsdp2", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="zero2", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="zero3", gpus=8, precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-8b", dict(strategy="zero3", gpus=8, precision="bf16-mixed", offload="optimizer+params",
                          gradient_checkpointing=True)),
    ("qwen2.5-7b", dict(strategy="fsdp2", gpus=4, method="lora", precision="bf16-mixed", gradient_checkpointing=True)),
    ("llama-3.1-70b", dict(strategy="zero1", gpus=64, gpus_per_node=8, tensor_parallel=8, pipeline_parallel=8,
                           sequence_parallel=True, gradient_checkpointing=True)),
]


if __name__ == "__main__":
    res = main()
    if len(sys.argv) > 2 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(json.dumps(res, indent=1))
