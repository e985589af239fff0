#!/usr/bin/env bash
# Device run of fresh_boundaries.py over every boundary record and probe file of validation/score_fit.py's
# list (validation/probes/fit-records.txt), then the probes tarred into $OUT. Extra arguments go to
# fresh_boundaries.py after the defaults (e.g. --only, --budget, --parallel-gib 130 on an H200); the list names every
# committed probe file, so a later call plans from what the earlier ones found.
set -u
. validation/probes/device-env.sh
timeout 560 python3 validation/probes/fresh_boundaries.py $(cat validation/probes/fit-records.txt) \
  --out /tmp/fb --parallel-gib 74 --parallel 4 --measured "$M" "$@" 2>&1 | tail -60
tar czf $OUT/fresh.tgz -C /tmp fb
