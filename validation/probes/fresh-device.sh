#!/usr/bin/env bash
# Device run of fresh_boundaries.py over every boundary record and probe file of validation/score_fit.py's
# list (validation/probes/fit-records.txt), then the probes tarred into $OUT. Extra arguments go to
# fresh_boundaries.py (e.g. --only, --budget); later calls pass the earlier calls' probes as records too.
set -u
. validation/probes/device-env.sh
timeout 560 python3 validation/probes/fresh_boundaries.py $(cat validation/probes/fit-records.txt) "$@" \
  --out /tmp/fb --parallel-gib 74 --parallel 4 --measured "$M" 2>&1 | tail -60
tar czf $OUT/fresh.tgz -C /tmp fb
