#!/usr/bin/env bash
# boundaries-15 (H100): the boundary searches of validation/jobs/boundaries-15.yaml (14 held-out pairs, 16-48 GiB
# cards), four at a time within 74 GiB of the GPU. Output: $OUT/boundaries-boundaries-15.json (rewritten after each
# entry), $OUT/log-boundaries.txt, $OUT/measured.txt ("$M": GPU, memory, driver; torch transformers peft).
# An outer timeout (520 s) keeps the call well inside the device's 600 s command limit and this session's device time.
# If the searches end early enough, the same call goes on with validation/probes/fresh_boundaries.py over the new
# pairs (the rule of fresh-device.sh, --only the h15 names, its budget what is left of the call) into $OUT/fb/
# (fresh-probes.json, fresh-log.txt): device starts were failing this session, so this saves a second start; a later
# fresh-device.sh call plans from whatever these fresh runs found once their file is in fit-records.txt.
set -u
. validation/probes/device-env.sh
echo "$M" > $OUT/measured.txt
export PYTHONUNBUFFERED=1
# B15_WALL / B15_BUDGET: a shorter call where less device time is left (records are written after each entry)
timeout ${B15_WALL:-520} python3 validation/run_boundaries.py validation/jobs/boundaries-15.yaml --out $OUT \
  --parallel-gib 74 --parallel 4 --budget ${B15_BUDGET:-420} --timeout 200 2>&1 | tail -40
echo "run_boundaries rc=${PIPESTATUS[0]} at ${SECONDS} s"
left=$((${B15_WALL:-520} - 5 - SECONDS))
if [ $left -gt 120 ] && [ -s $OUT/boundaries-boundaries-15.json ]; then
  names=$(python3 -c "import yaml;print(','.join(e['name'] for e in yaml.safe_load(open('validation/jobs/boundaries-15.yaml'))))")
  timeout $left python3 validation/probes/fresh_boundaries.py $(cat validation/probes/fit-records.txt) \
    $OUT/boundaries-boundaries-15.json --only "$names" --out $OUT/fb --parallel-gib 74 --parallel 4 \
    --timeout 110 --budget $((left - 120)) --measured "$M" 2>&1 | tail -40
  echo "fresh_boundaries rc=${PIPESTATUS[0]} at ${SECONDS} s"
else
  echo "no time left for fresh runs (${SECONDS} s)"
fi
cat $OUT/measured.txt
