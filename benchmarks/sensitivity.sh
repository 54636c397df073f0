#!/bin/bash
# issue 16 §1: the boosting arms in the paper's world, by how predictive a
# passive user's engagement history is (docs/experiments.md, "NE in the
# paper's world, and with the knob off"). Prints what it measured.
#
#   benchmarks/sensitivity.sh 0.1 0,1     # the paper's passive users, 2 seeds
#   benchmarks/sensitivity.sh 1.0 0       # the knob off (the world before it)
set -euo pipefail
SIGNAL=${1:-0.1}
SEEDS=${2:-0,1}
USERS=${USERS:-800}
DAYS=${DAYS:-4}
W=${OUT:-bench_out/sensitivity}/world_$SIGNAL
DYNAMIX=${DYNAMIX:-.venv/bin/dynamix}
[ -f "$W/events/_truth/truth.json" ] || "$DYNAMIX" generate "$W/events" --preset paper \
    --users "$USERS" --days "$DAYS" --seed 0 --passive-history-signal "$SIGNAL" --no-progress
[ -d "$W/seg/segments" ] || "$DYNAMIX" segment "$W/events" "$W/seg" --active-traffic 0.6667 --no-progress
"$DYNAMIX" experiment boosting "$W/events" "$W/seg" "$W/exp" --seeds "$SEEDS" --no-progress \
    --qps-requests 30 --qps-rounds 3
