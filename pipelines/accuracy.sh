#!/usr/bin/env bash
# The seeded accuracy study: one teacher trained on the whole training split, YOLO11n students on a subset, each
# trained plain, online AT and from the cache (static, warp, replay targets) with the same data, epochs and
# --aug-seed per seed; mAP mean +- std over seeds on the whole validation split. Then an --at-weight sweep of the
# replay student (exact targets, the cheapest AT run) on the same teacher and seeds.
# Writes $OUT/accuracy.{json,md} and copies them to pipelines/results/accuracy_$TAG.* (the sweep: accuracy_sweep_$TAG.*)
#
#   bash pipelines/accuracy.sh                                  # CPU, ~55 min on 2 cores (the README's table)
#   TAG=gpu bash pipelines/accuracy.sh --device 0 --images 5000 --imgsz 320 --student-images 2000 --teacher-epochs 60 --student-epochs 40
set -euo pipefail
OUT=${OUT:-runs/accuracy}
TAG=${TAG:-cpu}
SWEEP_WEIGHTS=${SWEEP_WEIGHTS:-0.3,3}  # empty: no sweep
mkdir -p pipelines/results
atcache study --out "$OUT" "$@"
cp "$OUT/accuracy.json" "pipelines/results/accuracy_$TAG.json"
cp "$OUT/accuracy.md" "pipelines/results/accuracy_$TAG.md"
if [ -n "$SWEEP_WEIGHTS" ]; then
  atcache study --out "$OUT" "$@" --modes replay --at-weights "$SWEEP_WEIGHTS"
  cp "$OUT/accuracy.json" "pipelines/results/accuracy_sweep_$TAG.json"
  cp "$OUT/accuracy.md" "pipelines/results/accuracy_sweep_$TAG.md"
fi
