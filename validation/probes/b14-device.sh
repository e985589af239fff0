#!/usr/bin/env bash
# boundaries-14 (H100), the first call after the search: fresh-process first trials at every batch where memfit
# (either verdict rule, as validation/probes/disagreements.py prints them) and the search disagree, the two-step
# allocator histories of OLMoE LoRA at 18 and 17 and the histories of Gemma-3-1B generate-512 at 291 and 290.
# Its files were written to $OUT one by one and only eight came back (the probes among the lost ones):
# b14-device-2.sh ran them again into one tarball.
set -u
. validation/probes/device-env.sh
echo "$M" > $OUT/measured.txt
W=$(python3 validation/probes/disagreements.py validation/jobs/boundaries-14.yaml validation/records/h100-boundaries-14.json 2>$OUT/disagreements.txt)
echo "probes: $W"
python3 validation/probes/first_trials.py validation/jobs/boundaries-14.yaml $W --out $OUT --timeout 100 --measured "$M" > $OUT/probes.log 2>&1
tail -12 $OUT/probes.log
job=$(python3 -c "import json;d=json.load(open('validation/records/h100-boundaries-14.json'));print(json.dumps([r for r in d if r['name']=='h14-olmoe-lora-attn-ckpt-40g'][0]['job']))")
for B in 18 17; do
  timeout 150 python3 validation/probes/memory_history.py olmoe-lora-b$B-cap-2steps "$job" $B $OUT/olmoe-lora-b$B-cap-2steps.json.gz --limit-bytes 42240835584 --steps 2 > $OUT/olmoe-lora-b$B-cap-2steps.log 2>&1
  tail -2 $OUT/olmoe-lora-b$B-cap-2steps.log
done
# gemma-3-1b generate 512 on 16 GiB: memfit 295, real 290 (291 fails asking 1.92 GiB in prefill at 13.49 GiB reserved)
gjob=$(python3 -c "import json;d=json.load(open('validation/records/h100-boundaries-14.json'));print(json.dumps([r for r in d if r['name']=='h14-gemma-3-1b-generate-512-16g'][0]['job']))")
for B in 291 290; do
  timeout 120 python3 validation/probes/memory_history.py gemma3-gen512-b$B-cap "$gjob" $B $OUT/gemma3-gen512-b$B-cap.json.gz --limit-bytes 16471031808 --steps 1 > $OUT/gemma3-gen512-b$B-cap.log 2>&1
  tail -2 $OUT/gemma3-gen512-b$B-cap.log
done
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/nvidia-smi.txt
