#!/usr/bin/env bash
# First trials in fresh processes (as a user runs a job) at the batches where memfit's answer and the
# boundaries-4 searches disagree; one at a time on the GPU, records and logs under $OUT.
cd "$(dirname "$0")/../.."
m() { n=$1; shift; timeout 200 python3 -m memfit.cli measure "$@" --out $OUT/$n.json > $OUT/$n.log 2>&1; echo "$n rc=$?"; tail -2 $OUT/$n.log; }
m p4-phi-3-mini-prefill-4k-b43 phi-3-mini --task infer --precision bf16-true --prompt-len 4096 --new-tokens 0 --batch-size 43 --gpu-memory 24GiB --steps 1
m p4-phi-3-mini-prefill-4k-b44 phi-3-mini --task infer --precision bf16-true --prompt-len 4096 --new-tokens 0 --batch-size 44 --gpu-memory 24GiB --steps 1
m p4-llama-3.2-1b-full-ckpt-b4 llama-3.2-1b --precision bf16-true --optimizer adamw --seq-len 2048 --gradient-checkpointing --batch-size 4 --gpu-memory 24GiB --steps 2
m p4-gemma-3-1b-gen-exp-b171 gemma-3-1b --task infer --precision bf16-true --prompt-len 1024 --new-tokens 64 --expandable-segments --batch-size 171 --gpu-memory 16GiB --steps 1
