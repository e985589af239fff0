#!/usr/bin/env bash
# Allocator histories of the boundaries-3 misses (validation/probes/memory_history.py), two waves of runs side
# by side on one H200 (each capped at its record's allocator limit, or uncapped where the question is the peak's
# contents), everything under $OUT/h.tgz.
set -u
cd "$(dirname "$0")/../.."
mkdir -p /tmp/h
job() { python3 -c "import json,sys;d=json.load(open('validation/records/h200-boundaries-3.json'));print(json.dumps([r for r in d if r['name']==sys.argv[1]][0]['job']))" "$1"; }
run() { # name record batch limit(or 0) [env]
  local lim=""; [ "$4" != 0 ] && lim="--limit-bytes $4"
  env ${5:-X=1} python3 validation/probes/memory_history.py "$1" "$(job $2)" "$3" "/tmp/h/$1.json.gz" $lim > "/tmp/h/$1.log" 2>&1
  tail -2 "/tmp/h/$1.log"
}
# wave 1: about 118 GiB together
run olmoe-b110-cap h3-olmoe-1b-7b-generate 110 50830770176 &
run qwen7b-prefill-b21-cap h3-qwen2.5-7b-prefill-4k 21 42240835584 &
run llama1b-lora-4k-b2-cap h3-llama-3.2-1b-lora-attn-ckpt-4k 2 16471031808 &
wait
# wave 2
run llama8b-lora-b2-cap h3-llama-3.1-8b-lora-ckpt-24g 2 25060966400 &
run llama3b-gen-b173-cap h3-llama-3.2-3b-generate-256 173 16471031808 &
run olmoe-b109-cap h3-olmoe-1b-7b-generate 109 50830770176 &
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > /tmp/h/nvidia-smi.txt
tar czf "$OUT/h.tgz" -C /tmp h
ls -la /tmp/h
