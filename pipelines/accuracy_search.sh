#!/usr/bin/env bash
# The search for a CPU-scale setup where attention transfer has room to help, on the accuracy study's teacher (run
# pipelines/accuracy.sh first: same OUT). Each setup: the plain student against the replay student (the teacher's
# exact maps on the augmented images, the cheapest AT run) over the same seeds; results to
# pipelines/results/accuracy_search_<setup>_$TAG.json / .md (plain only where the data changes). Every setup tried is listed here and in the README.
#   bash pipelines/accuracy_search.sh          # ~15 min on 2 cores
set -euo pipefail
OUT=${OUT:-runs/accuracy}
TAG=${TAG:-cpu}
mkdir -p pipelines/results
run() {  # name, then atcache study options
  local name=$1; shift
  atcache study --out "$OUT" "$@"
  cp "$OUT/accuracy.json" "pipelines/results/accuracy_search_${name}_$TAG.json"
  cp "$OUT/accuracy.md" "pipelines/results/accuracy_search_${name}_$TAG.md"
}
# (plain at 300 images is the main study's; plain is not run again where only AT settings change)
run fine_layers --modes replay --layers 13,16,19                    # no stride-32 layers (5x5 maps at 160 px)
run few_images --modes plain,replay --student-images 100            # the teacher has seen 12x what the students see
run few_images_w3 --modes replay --student-images 100 --at-weights 3
