#!/usr/bin/env bash
# The seeded accuracy study: one teacher trained on the whole training split, YOLO11n students on a subset, each
# trained plain, online AT, from the cache (static, warp, replay targets), with gradient-based AT from replay targets
# (grad) and with the flip-symmetry term (flip), with the same data, epochs and --aug-seed per seed; mAP mean +- std
# over seeds on the whole validation split and each mode's paired per-seed difference to plain with its 95 % CI.
# plain, replay, grad and flip run 10 seeds, the others 3. Students already trained in $OUT with the same settings
# are reused, so an interrupted run continues where it stopped; their records are also kept in
# pipelines/results/accuracy_${TAG}_runs.json (--ledger), so a run in a fresh checkout reuses them too. Then an
# --at-weight sweep of the replay student (exact targets, the cheapest AT run) on the same teacher and seeds 0-2,
# paired with the same plain students (SWEEP_WEIGHTS= skips it).
# Writes $OUT/accuracy.{json,md} and copies them to pipelines/results/accuracy_$TAG.* (the sweep: accuracy_sweep_$TAG.*)
#
#   bash pipelines/accuracy.sh                                  # CPU, ~4 h on 2 cores (the README's table)
#   TAG=gpu bash pipelines/accuracy.sh --device 0 --images 5000 --imgsz 320 --student-images 2000 --teacher-epochs 60 --student-epochs 40
set -euo pipefail
OUT=${OUT:-runs/accuracy}
TAG=${TAG:-cpu}
SWEEP_WEIGHTS=${SWEEP_WEIGHTS-0.3,1,3}  # set and empty: no sweep
mkdir -p pipelines/results
SEEDS=${SEEDS:-0,1,2,3,4,5,6,7,8,9}
atcache study --out "$OUT" --ledger "pipelines/results/accuracy_${TAG}_runs.json" --seeds "$SEEDS" \
  --mode-seeds online=3,static=3,warp=3 "$@"
cp "$OUT/accuracy.json" "pipelines/results/accuracy_$TAG.json"
cp "$OUT/accuracy.md" "pipelines/results/accuracy_$TAG.md"
if [ -n "$SWEEP_WEIGHTS" ]; then
  atcache study --out "$OUT" --ledger "pipelines/results/accuracy_${TAG}_runs.json" --seeds 0,1,2 "$@" \
    --modes plain,replay --at-weights "$SWEEP_WEIGHTS"
  cp "$OUT/accuracy.json" "pipelines/results/accuracy_sweep_$TAG.json"
  cp "$OUT/accuracy.md" "pipelines/results/accuracy_sweep_$TAG.md"
fi
