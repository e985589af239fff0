#!/usr/bin/env python3
"""Writes validation/jobs/boundaries-15.yaml (the pairs, each with `start` = memfit's max_batch_size then). Run once, before any
of the pairs ran; kept to show how the list and its starts were made (modelled on make_boundaries_14.py).

    python validation/jobs/make_boundaries_15.py [OUT.yaml]
"""
import subprocess
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "validation" / "jobs"))
from boundary_list import write_boundary_list  # noqa: E402
BF="bf16-true"; ATT=["q_proj","k_proj","v_proj","o_proj"]
P=[("h15-gemma-3-4b-lora-ckpt-1k-32g", dict(model="gemma-3-4b", method="lora", lora_rank=16, precision=BF, seq_len=1024, gradient_checkpointing=True), "32GiB", None),
 ("h15-gemma-3-4b-lora-1k-24g", dict(model="gemma-3-4b", method="lora", lora_rank=16, precision=BF, seq_len=1024), "24GiB", None),
 ("h15-granite-3.1-2b-lora-ckpt-16g", dict(model="granite-3.1-2b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "16GiB", None),
 ("h15-granite-3.1-2b-lora-1k-24g", dict(model="granite-3.1-2b", method="lora", lora_rank=16, precision=BF, seq_len=1024), "24GiB", None),
 ("h15-olmo-2-7b-lora-ckpt-1k-32g", dict(model="olmo-2-7b", method="lora", lora_rank=16, precision=BF, seq_len=1024, gradient_checkpointing=True), "32GiB", None),
 ("h15-olmo-1b-lora-2k-16g", dict(model="olmo-1b", method="lora", lora_rank=16, precision=BF, seq_len=2048), "16GiB", None),
 ("h15-qwen3-0.6b-full-1k-24g", dict(model="qwen3-0.6b", precision=BF, optimizer="adamw", seq_len=1024), "24GiB", None),
 ("h15-r1-distill-qwen-1.5b-full-ckpt-32g", dict(model="deepseek-r1-distill-qwen-1.5b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "32GiB", None),
 ("h15-qlora-olmo-2-7b-ckpt-24g", dict(model="olmo-2-7b", method="qlora", precision=BF, seq_len=2048, gradient_checkpointing=True), "24GiB", "bitsandbytes"),
 ("h15-phi-3-mini-lora-ckpt-exp-32g", dict(model="phi-3-mini", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True, expandable_segments=True), "32GiB", None),
 ("h15-qwen1.5-moe-lora-attn-ckpt-2k-48g", dict(model="qwen1.5-moe-a2.7b", method="lora", lora_rank=16, lora_targets=ATT, precision=BF, seq_len=2048, gradient_checkpointing=True), "48GiB", None),
 ("h15-gemma-2-9b-lora-ckpt-1k-32g", dict(model="gemma-2-9b", method="lora", lora_rank=16, precision=BF, seq_len=1024, gradient_checkpointing=True), "32GiB", None),
 ("h15-granite-3.1-2b-generate-1k-16g", dict(model="granite-3.1-2b", task="infer", precision=BF, prompt_len=1024, new_tokens=128), "16GiB", None),
 ("h15-olmo-2-7b-prefill-2k-24g", dict(model="olmo-2-7b", task="infer", precision=BF, prompt_len=2048, new_tokens=0), "24GiB", None),
]
head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h"], capture_output=True, text=True).stdout.strip()
out=[f"# A fifteenth set of card/job pairs for validation/run_boundaries.py, written 2026-12-07 on main {head} before any of",
"# them ran: every pair is held out (nothing in the estimator is tuned on it), the next independent test of the fit answer",
"# as it ships (issue 9). Training: LoRA with and without checkpointing on families seldom rehearsed before (gemma-3-4b,",
"# granite-3.1-2b, olmo-2-7b, olmo-1b), one with expandable segments (phi-3-mini), gemma-2-9b's 256k vocabulary, one MoE",
"# (qwen1.5-moe LoRA on attention with checkpointing), two full fine-tunings of 0.6-1.5B models, one QLoRA (olmo-2-7b);",
"# inference: a decode (granite-3.1-2b) and a prefill (olmo-2-7b). `start` is memfit's max_batch_size when the list was",
"# written (both address orders; `one order` in the comment where the rule off answers otherwise). Cards are GiB, 16-48:",
"# an H100 rehearses them, several side by side."]
write_boundary_list(P, out, sys.argv[1] if len(sys.argv) > 1 else REPO / "validation/jobs/boundaries-15.yaml")
