#!/usr/bin/env bash
# Allocator histories (validation/probes/memory_history.py) of the two pairs memfit answers more than one below
# (session 5): Phi-3-mini prefill 4k at B=44 on 24 GiB (memfit 42) and Llama-3.2-3B generate-256 at B=173 on
# 16 GiB (memfit 170), each capped at its record's allocator limit, side by side on one H200; the largest
# batch memfit says runs (42, 170) is recorded too, for the comparison of the same stream below the wall.
set -u
cd "$(dirname "$0")/../.."
mkdir -p /tmp/h
job() { python3 -c "import json,sys;d=json.load(open('validation/records/'+sys.argv[1]));print(json.dumps([r for r in d if r['name']==sys.argv[2]][0]['job']))" "$1" "$2"; }
run() { # name recordfile record batch limit
  python3 validation/probes/memory_history.py "$1" "$(job $2 $3)" "$4" "/tmp/h/$1.json.gz" --limit-bytes "$5" --steps 1 > "/tmp/h/$1.log" 2>&1
  tail -2 "/tmp/h/$1.log"
}
run phi3-prefill4k-b44-cap h200-boundaries-4.json h4-phi-3-mini-prefill-4k 44 25060966400 &
run llama3b-gen-b173-cap h200-boundaries-3.json h3-llama-3.2-3b-generate-256 173 16471031808 &
run phi3-prefill4k-b42-cap h200-boundaries-4.json h4-phi-3-mini-prefill-4k 42 25060966400 &
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > /tmp/h/nvidia-smi.txt
tar czf "$OUT/h5.tgz" -C /tmp h
ls -la /tmp/h
