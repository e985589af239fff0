#!/usr/bin/env bash
# Fresh-process first trials at the search's boundary B of every training pair memfit answers above: each
# search reached B only as its second trial, after B + 1 failed in the same process (boundaries-14's OLMoE pair
# showed such a B need not run fresh: the search's 17, a fresh process's 15). Run on whatever card the device
# gives (these pairs were searched on an H200); the cap is the pair's card less the CUDA context measured here.
set -u
. validation/probes/device-env.sh
for spec in boundaries-5:h5-olmoe-1b-7b-lora-attn-ckpt:17 boundaries-8:h8-olmoe-lora-attn-ckpt-24g:13 \
            boundaries-10:h10-olmoe-lora-attn-ckpt-2k-32g:11 boundaries-11:h11-olmoe-lora-attn-ckpt-1k-48g:46 \
            boundaries-9:h9-olmoe-lora-attn-ckpt-4k:8 boundaries-13:h13-mistral-7b-lora-ckpt-32g:11 \
            boundaries-11:h11-mistral-7b-lora-ckpt-48g:22 boundaries-3:h3-llama-3.1-8b-lora-ckpt-24g:1; do
  y=${spec%%:*}; run=${spec#*:}
  mkdir -p /tmp/af/$y-${run%%:*}
  timeout 90 python3 validation/probes/first_trials.py validation/jobs/$y.yaml $run --out /tmp/af/$y-${run%%:*} --timeout 80 --measured "$M" 2>&1 | tail -1
  tar czf $OUT/above-fresh.tgz -C /tmp af
done
