#!/usr/bin/env bash
# boundaries-14 (H100): fresh-process first trials where memfit (either verdict rule) and the search disagree,
# plus OLMoE at 17 (the search's answer, which a fresh two-step history run failed) and Qwen3-8B at 12, and the
# two-step allocator history of OLMoE LoRA at 18 under the record's limit. Everything lands in one tarball.
set -u
. validation/probes/device-env.sh
R=/tmp/r; mkdir -p $R
echo "$M" > $R/measured.txt
python3 validation/probes/first_trials.py validation/jobs/boundaries-14.yaml \
  h14-olmoe-lora-attn-ckpt-40g:17 h14-olmoe-lora-attn-ckpt-40g:18 h14-qwen3-8b-lora-ckpt-1k-48g:12 \
  h14-qwen3-8b-lora-ckpt-1k-48g:13 h14-qwen3-8b-lora-ckpt-1k-48g:15 h14-gemma-3-1b-generate-512-16g:295 \
  h14-qlora-qwen2.5-7b-ckpt-24g:3 h14-qwen2.5-7b-generate-1k-24g:43 h14-mistral-7b-lora-ckpt-40g:18 \
  h14-granite-3.1-8b-lora-ckpt-1k-48g:29 --out $R --timeout 100 --measured "$M" > $R/probes.log 2>&1
tail -12 $R/probes.log
job=$(python3 -c "import json;d=json.load(open('validation/records/h100-boundaries-14.json'));print(json.dumps([r for r in d if r['name']=='h14-olmoe-lora-attn-ckpt-40g'][0]['job']))")
timeout 150 python3 validation/probes/memory_history.py olmoe-lora-b18-cap-2steps "$job" 18 $R/olmoe-lora-b18-cap-2steps.json.gz --limit-bytes 42240835584 --steps 2 > $R/olmoe-lora-b18-cap-2steps.log 2>&1
tail -1 $R/olmoe-lora-b18-cap-2steps.log
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/nvidia-smi.txt
tar czf $OUT/b14.tgz -C /tmp r
