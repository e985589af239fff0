#!/usr/bin/env bash
# Allocator histories (validation/probes/memory_history.py) of the boundaries-5 pairs memfit answers wrongly
# (session 5): two answered one above (Llama-3.1-8B LoRA ckpt 48 GiB: memfit 9, real 8; OLMoE LoRA attn ckpt 40 GiB:
# memfit 18, real 17) at the failing and the passing batch, and Phi-3-mini prefill 2k 24 GiB (memfit 84, real 89)
# at 89, each capped at its record's allocator limit, side by side on one H200; everything under $OUT/h5b.tgz.
set -u
cd "$(dirname "$0")/../.."
mkdir -p /tmp/h
job() { python3 -c "import json,sys;d=json.load(open('validation/records/h200-boundaries-5.json'));print(json.dumps([r for r in d if r['name']==sys.argv[1]][0]['job']))" "$1"; }
lim() { python3 -c "import json,sys;d=json.load(open('validation/records/h200-boundaries-5.json'));print([r for r in d if r['name']==sys.argv[1]][0]['find_max_batch']['card']['allocator_limit_bytes'])" "$1"; }
run() { # name record batch
  python3 validation/probes/memory_history.py "$1" "$(job $2)" "$3" "/tmp/h/$1.json.gz" --limit-bytes "$(lim $2)" --steps 1 > "/tmp/h/$1.log" 2>&1
  tail -2 "/tmp/h/$1.log"
}
run llama8b-lora-b9-cap h5-llama-3.1-8b-lora-ckpt-48g 9 &
run olmoe-lora-b18-cap h5-olmoe-1b-7b-lora-attn-ckpt 18 &
run phi3-prefill2k-b89-cap h5-phi-3-mini-prefill-2k 89 &
wait
run llama8b-lora-b8-cap h5-llama-3.1-8b-lora-ckpt-48g 8 &
run olmoe-lora-b17-cap h5-olmoe-1b-7b-lora-attn-ckpt 17 &
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > /tmp/h/nvidia-smi.txt
tar czf "$OUT/h5b.tgz" -C /tmp h
ls -la /tmp/h
