#!/usr/bin/env bash
# The demo pipeline: synthetic VOC-format data -> prepare-voc -> a briefly trained YOLO11s teacher -> its cache ->
# a YOLO11n student trained plain, from the cache and online for the same epochs -> one table
# (runs/demo/demo_results.md and .json), copied into pipelines/results/ with the machine in its last line.
#
#   bash pipelines/demo.sh                      # CPU, ~6-7 min on 2 cores (two jobs at a time; it prints an estimate first)
#   TAG=gpu bash pipelines/demo.sh --device 0 --images 2000 --imgsz 320 --teacher-epochs 60 --student-epochs 40   # a GPU
set -euo pipefail
OUT=${OUT:-runs/demo}
atcache demo --out "$OUT" "$@"
mkdir -p pipelines/results
TAG=${TAG:-cpu}  # TAG=gpu when run with --device 0
cp "$OUT/demo_results.json" "pipelines/results/demo_$TAG.json"
cp "$OUT/demo_results.md" "pipelines/results/demo_$TAG.md"
