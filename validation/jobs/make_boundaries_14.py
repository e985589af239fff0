#!/usr/bin/env python3
"""Writes validation/jobs/boundaries-14.yaml (the pairs, each with `start` = memfit's max_batch_size then). Run once, before any
of the pairs ran; kept to show how the list and its starts were made.

    python validation/jobs/make_boundaries_14.py [OUT.yaml]
"""
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "validation" / "jobs"))
from boundary_list import write_boundary_list  # noqa: E402
BF="bf16-true"; ATT=["q_proj","k_proj","v_proj","o_proj"]
P=[("h14-llama-3.1-8b-lora-ckpt-32g", dict(model="llama-3.1-8b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "32GiB", None),
 ("h14-qwen2.5-7b-lora-ckpt-1k-24g", dict(model="qwen2.5-7b", method="lora", lora_rank=16, precision=BF, seq_len=1024, gradient_checkpointing=True), "24GiB", None),
 ("h14-qwen3-8b-lora-ckpt-32g", dict(model="qwen3-8b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "32GiB", None),
 ("h14-gemma-2-2b-lora-ckpt-24g", dict(model="gemma-2-2b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "24GiB", None),
 ("h14-phi-3-mini-lora-ckpt-4k-40g", dict(model="phi-3-mini", method="lora", lora_rank=16, precision=BF, seq_len=4096, gradient_checkpointing=True), "40GiB", None),
 ("h14-llama-3.2-3b-lora-ckpt-exp-24g", dict(model="llama-3.2-3b", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True, expandable_segments=True), "24GiB", None),
 ("h14-qwen3-4b-full-ckpt-48g", dict(model="qwen3-4b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "48GiB", None),
 ("h14-llama-3.2-1b-full-32g", dict(model="llama-3.2-1b", precision=BF, optimizer="adamw", seq_len=1024), "32GiB", None),
 ("h14-qwen2.5-3b-full-ckpt-40g", dict(model="qwen2.5-3b", precision=BF, optimizer="adamw", seq_len=2048, gradient_checkpointing=True), "40GiB", None),
 ("h14-qlora-qwen2.5-7b-ckpt-24g", dict(model="qwen2.5-7b", method="qlora", precision=BF, seq_len=2048, gradient_checkpointing=True), "24GiB", "bitsandbytes"),
 ("h14-olmoe-lora-attn-ckpt-40g", dict(model="olmoe-1b-7b", method="lora", lora_rank=16, lora_targets=ATT, precision=BF, seq_len=2048, gradient_checkpointing=True), "40GiB", None),
 ("h14-mistral-7b-lora-ckpt-40g", dict(model="mistral-7b-v0.3", method="lora", lora_rank=16, precision=BF, seq_len=2048, gradient_checkpointing=True), "40GiB", None),
 ("h14-qwen3-8b-lora-ckpt-1k-48g", dict(model="qwen3-8b", method="lora", lora_rank=16, precision=BF, seq_len=1024, gradient_checkpointing=True), "48GiB", None),
 ("h14-granite-3.1-8b-lora-ckpt-1k-48g", dict(model="granite-3.1-8b", method="lora", lora_rank=16, precision=BF, seq_len=1024, gradient_checkpointing=True), "48GiB", None),
 ("h14-qwen2.5-7b-generate-1k-24g", dict(model="qwen2.5-7b", task="infer", precision=BF, prompt_len=1024, new_tokens=128), "24GiB", None),
 ("h14-llama-3.2-3b-prefill-4k-16g", dict(model="llama-3.2-3b", task="infer", precision=BF, prompt_len=4096, new_tokens=0), "16GiB", None),
 ("h14-gemma-3-1b-generate-512-16g", dict(model="gemma-3-1b", task="infer", precision=BF, prompt_len=512, new_tokens=128), "16GiB", None),
]
out=["# A fourteenth set of card/job pairs for validation/run_boundaries.py, written 2026-12-07 (08:50 UTC) on main 6559f41",
"# (the compiled stream: the same streams and answers as 0ab5fc4, the shipped two-order training verdict) before any of",
"# them ran: every pair is held out, the next independent test of the fit answer as it ships. Training: LoRA with",
"# checkpointing on seven dense families (one with expandable segments), gemma-2-2b's 256k vocabulary, one MoE (OLMoE, whose",
"# LoRA pairs memfit has answered above the real boundary before), three full fine-tunings, one QLoRA; inference: a",
"# decode, a prefill, a 256k-vocabulary decode. Three LoRA pairs (mistral-7b 2k 40g, qwen3-8b 1k 48g, granite-3.1-8b 1k",
"# 48g) are ones where the two-order rule moves memfit's answer, found by scanning LoRA and full checkpointed jobs of",
"# eleven models on 24-48 GiB cards with the rule on and off (no result looked at); the others it leaves alone. `start` is",
"# memfit's max_batch_size when the list was written (both address orders; `one order` in the comment where the rule off",
"# answers otherwise). Cards are GiB, at most 48: an H100 rehearses them."]
write_boundary_list(P, out, sys.argv[1] if len(sys.argv) > 1 else REPO / "validation/jobs/boundaries-14.yaml")
