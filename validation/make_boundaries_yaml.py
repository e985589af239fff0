#!/usr/bin/env python3
"""Writes validation/jobs/boundaries.yaml: the card/job pairs, each with ``start`` = memfit's current
max_batch_size estimate (a search hint). Holdouts are fixed here, not chosen from results.

    PYTHONPATH=src python validation/make_boundaries_yaml.py
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from memfit.job import Job
from memfit.estimator import max_batch_size
from memfit.units import parse_card_memory
BF = "bf16-true"
ATT = ["q_proj", "k_proj", "v_proj", "o_proj"]
# (name, job, card, holdout)  -- holdout chosen here, before any result exists, spread over the classes
BASE = [
 # full fine-tuning
 ("llama-3.1-8b-full-ckpt", dict(model="llama-3.1-8b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "80GiB", False),
 ("qwen2.5-0.5b-full", dict(model="qwen2.5-0.5b", precision=BF, optimizer="adamw", seq_len=1024), "16GiB", False),
 ("qwen2.5-0.5b-full-mixed", dict(model="qwen2.5-0.5b", precision="bf16-mixed", optimizer="adamw", seq_len=1024), "24GiB", True),
 ("llama-3.2-1b-full", dict(model="llama-3.2-1b", precision=BF, optimizer="adamw", seq_len=1024), "24GiB", False),
 ("llama-3.2-1b-full-ckpt", dict(model="llama-3.2-1b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "16GiB", True),
 ("gemma-3-1b-full", dict(model="gemma-3-1b", precision=BF, optimizer="adamw", seq_len=1024), "24GiB", False),
 ("qwen2.5-1.5b-full", dict(model="qwen2.5-1.5b", precision=BF, optimizer="adamw", seq_len=1024), "40GiB", False),
 ("qwen3-1.7b-full-ckpt", dict(model="qwen3-1.7b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "24GiB", True),
 ("llama-3.2-3b-full-ckpt", dict(model="llama-3.2-3b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "48GiB", False),
 # LoRA
 ("gemma-2-2b-lora", dict(model="gemma-2-2b", method="lora", lora_rank=16, precision=BF, seq_len=1024), "24GiB", False),
 ("llama-3.2-3b-lora", dict(model="llama-3.2-3b", method="lora", lora_rank=16, precision=BF, seq_len=1024), "24GiB", True),
 ("qwen2.5-3b-lora-ckpt", dict(model="qwen2.5-3b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "16GiB", False),
 ("qwen3-4b-lora-attn", dict(model="qwen3-4b", method="lora", lora_rank=16, lora_targets=ATT, precision=BF, seq_len=1024), "24GiB", False),
 ("phi-3-mini-lora-ckpt", dict(model="phi-3-mini", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "24GiB", True),
 ("mistral-7b-lora-ckpt", dict(model="mistral-7b-v0.3", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "24GiB", False),
 ("llama-3.1-8b-lora-ckpt", dict(model="llama-3.1-8b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "40GiB", True),
 ("olmoe-1b-7b-lora-attn", dict(model="olmoe-1b-7b", method="lora", lora_rank=16, lora_targets=ATT, precision=BF, seq_len=1024), "40GiB", False),
 # QLoRA (bitsandbytes)
 ("qlora-llama-3.2-1b-ckpt", dict(model="llama-3.2-1b", method="qlora", precision=BF, seq_len=2048, gradient_checkpointing=True), "16GiB", False),
 ("qlora-qwen2.5-1.5b", dict(model="qwen2.5-1.5b", method="qlora", precision=BF, seq_len=1024), "24GiB", True),
 ("qlora-qwen2.5-0.5b", dict(model="qwen2.5-0.5b", method="qlora", precision=BF, seq_len=1024), "16GiB", False),
 # inference: generate, long decode, long prefill
 ("gemma-3-1b-generate-2048", dict(model="gemma-3-1b", task="infer", precision=BF, prompt_len=2048, new_tokens=128), "16GiB", False),
 ("llama-3.2-1b-decode-512", dict(model="llama-3.2-1b", task="infer", precision=BF, prompt_len=256, new_tokens=512), "16GiB", False),
 ("qwen2.5-1.5b-decode-512", dict(model="qwen2.5-1.5b", task="infer", precision=BF, prompt_len=512, new_tokens=512), "16GiB", True),
 ("llama-3.2-1b-prefill-8k", dict(model="llama-3.2-1b", task="infer", precision=BF, prompt_len=8192, new_tokens=0), "16GiB", False),
 ("qwen3-4b-prefill-4k", dict(model="qwen3-4b", task="infer", precision=BF, prompt_len=4096, new_tokens=0), "24GiB", True),
 ("gemma-2-2b-prefill-4k", dict(model="gemma-2-2b", task="infer", precision=BF, prompt_len=4096, new_tokens=0), "16GiB", False),
 ("llama-3.1-8b-prefill-2k", dict(model="llama-3.1-8b", task="infer", precision=BF, prompt_len=2048, new_tokens=0), "24GiB", False),
 ("mistral-7b-generate", dict(model="mistral-7b-v0.3", task="infer", precision=BF, prompt_len=1024, new_tokens=128), "48GiB", True),
]
# repeated with expandable_segments (holdout chosen separately)
EXP = {"llama-3.1-8b-full-ckpt": False, "qwen2.5-0.5b-full": True, "llama-3.2-1b-full": False,
       "gemma-3-1b-full": True, "qwen3-1.7b-full-ckpt": False, "llama-3.2-3b-lora": False,
       "mistral-7b-lora-ckpt": True, "qlora-llama-3.2-1b-ckpt": False, "gemma-3-1b-generate-2048": True,
       "llama-3.2-1b-prefill-8k": False, "qwen3-4b-prefill-4k": False}
# long decodes: ~60 s a trial with five runs sharing the GPU (first H200 run: 1024 new tokens timed out)
TIMEOUT = {"llama-3.2-1b-decode-512": 300, "qwen2.5-1.5b-decode-512": 300}
import json
def flow(d):
    return "{" + ", ".join(f"{k}: {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" if not isinstance(v, str) else f"{k}: {v}" for k, v in d.items()) + "}"
rows = []
for name, job, card, hold in BASE:
    rows.append((name, job, card, hold))
for name, job, card, hold in BASE:
    if name in EXP:
        rows.append((name + "-exp", {**job, "expandable_segments": True}, card, EXP[name]))
# slow ones first (the runner starts entries in list order as room allows): 8B full, QLoRA builds, long decode
SLOW = ["llama-3.1-8b-full-ckpt", "llama-3.1-8b-full-ckpt-exp", "qlora-llama-3.2-1b-ckpt", "qlora-qwen2.5-1.5b",
        "qlora-qwen2.5-0.5b", "qlora-llama-3.2-1b-ckpt-exp", "llama-3.2-1b-decode-512", "qwen2.5-1.5b-decode-512"]
rows.sort(key=lambda r: SLOW.index(r[0]) if r[0] in SLOW else len(SLOW))
lines = ["# Card/job pairs for validation/run_boundaries.py: the real largest micro-batch of each job on a card",
         "# rehearsed on one H200 (allocator capped at the card less the CUDA context). `start` is memfit's",
         "# max_batch_size estimate when this list was written (a hint: the search still proves b runs and b+1",
         "# does not). `holdout: true` pairs were chosen before any result existed and are scored separately.",
         "# `-exp` entries repeat a pair with expandable_segments. Cards are GiB (2**30 bytes). The slow entries",
         "# (8B full fine-tuning, QLoRA's quantized build, long decode) come first so they start first."]
for name, job, card, hold in rows:
    n = max_batch_size(Job.from_dict({**job, "batch_size": 1}), parse_card_memory(card))
    extra = ", needs: bitsandbytes" if job.get("method") == "qlora" else ""
    if name in TIMEOUT:
        extra += f", timeout: {TIMEOUT[name]}"
    lines.append(f"- {{name: {name}, gpu_memory: {card}, start: {max(n, 1)}, holdout: {str(hold).lower()}{extra},\n"
                 f"   job: {flow(job)}}}")
open(REPO / "validation" / "jobs" / "boundaries.yaml", "w").write("\n".join(lines) + "\n")
print(len(rows), sum(h for *_, h in rows))
