#!/usr/bin/env bash
# First trials in fresh processes (as a user runs a job) at every batch where memfit's answer and the
# boundaries-7 searches disagree (both directions); two lanes at once on the GPU (each process capped to its
# card), records and logs under $OUT.
cd "$(dirname "$0")/../.."
m() { n=$1; shift; timeout 240 python3 -m memfit.cli measure "$@" --out $OUT/$n.json > $OUT/$n.log 2>&1; echo "$n rc=$?"; tail -2 $OUT/$n.log; }
T="--precision bf16-true"
(
m p7-gemma-3-1b-lora-b2 gemma-3-1b --method lora --lora-rank 16 $T --seq-len 1024 --batch-size 2 --gpu-memory 16GiB --steps 2
m p7-llama-3.2-1b-full-mixed-ckpt-b2 llama-3.2-1b --precision bf16-mixed --optimizer adamw --seq-len 2048 --gradient-checkpointing --batch-size 2 --gpu-memory 24GiB --steps 2
m p7-phi-4-lora-ckpt-b6 phi-4 --method lora --lora-rank 16 $T --seq-len 1024 --gradient-checkpointing --batch-size 6 --gpu-memory 40GiB --steps 2
m p7-qwen1.5-moe-lora-attn-ckpt-b6 qwen1.5-moe-a2.7b --method lora --lora-rank 16 --lora-targets q_proj,k_proj,v_proj,o_proj $T --seq-len 1024 --gradient-checkpointing --batch-size 6 --gpu-memory 40GiB --steps 2
) > $OUT/lane1.txt 2>&1 &
(
m p7-pythia-1b-generate-1k-b67 pythia-1b --task infer $T --prompt-len 1024 --new-tokens 128 --batch-size 67 --gpu-memory 16GiB --steps 1
m p7-pythia-1b-generate-1k-b71 pythia-1b --task infer $T --prompt-len 1024 --new-tokens 128 --batch-size 71 --gpu-memory 16GiB --steps 1
m p7-pythia-1b-generate-1k-b66 pythia-1b --task infer $T --prompt-len 1024 --new-tokens 128 --batch-size 66 --gpu-memory 16GiB --steps 1
) > $OUT/lane2.txt 2>&1 &
wait
cat $OUT/lane1.txt $OUT/lane2.txt
